"""GSM8K and CommonsenseQA in their hub formats: from the hub (``datasets``) or local json/jsonl files.

Hub formats (the bundled samples in ``quietstar/data/`` use the same fields):
    gsm8k          {"question": str, "answer": "... reasoning ...\\n#### 72"}
    commonsense_qa {"question": str, "choices": {"label": ["A".."E"], "text": [...]}, "answerKey": "A"}
Prompts follow the reference's evaluation: ``"Q: " + question [+ "\\n(A) choice" ...] + "\\nA:"`` and
the answer ``" " + final answer + "\\n"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ANSWER_MARKER = "\nA:"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str
    hub_config: str | None
    hub_split: str  # the split the paper reports (CommonsenseQA's test labels are not public)
    sample_file: str


TASKS = {
    "gsm8k": TaskSpec("gsm8k", "openai/gsm8k", "main", "test", "gsm8k_sample.jsonl"),
    "commonsense_qa": TaskSpec("commonsense_qa", "tau/commonsense_qa", None, "validation", "commonsense_qa_sample.jsonl"),
}


def check_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def sample_path(task: str) -> Path:
    """The small offline sample of ``task`` shipped with the package."""
    return Path(os.path.dirname(os.path.dirname(__file__))) / "data" / check_task(task).sample_file


def load_examples(task: str, source: str = "sample", split: str | None = None, limit: int | None = None) -> list[dict]:
    """Examples of ``task`` as dicts in the hub format.

    ``source``: "sample" (the bundled file), "hub" (``datasets.load_dataset`` of the hub set), or a
    path to a local .json/.jsonl file in the same format.
    """
    spec = check_task(task)
    if source == "hub":
        try:
            import datasets
        except ImportError as err:
            raise ImportError("loading from the hub needs `datasets`: pip install 'quietstar[eval]'") from err
        data = datasets.load_dataset(spec.hub_path, spec.hub_config, split=split or spec.hub_split)
        rows = [dict(row) for row in (data.select(range(min(limit, len(data)))) if limit else data)]
    else:
        path = sample_path(task) if source == "sample" else Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass 'sample', 'hub' or a .json/.jsonl file in the {task} hub format")
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = rows[:limit] if limit else rows
    for i, row in enumerate(rows):
        _check_row(task, row, i)
    return rows


def _check_row(task: str, row: dict, index: int) -> None:
    need = ("question", "answer") if task == "gsm8k" else ("question", "choices", "answerKey")
    missing = [k for k in need if k not in row]
    if missing:
        raise ValueError(f"{task} example {index} lacks field(s) {missing}; expected the hub format with {need}")
    if task == "gsm8k" and "####" not in row["answer"]:
        raise ValueError(f"gsm8k example {index}: the answer must end with '#### <number>', got {row['answer'][-40:]!r}")


def format_example(task: str, row: dict) -> tuple[str, str]:
    """(prompt, answer) strings: the metric scores the answer tokens after the prompt."""
    if task == "gsm8k":
        final = row["answer"].split("####")[-1].strip()  # commas kept, as the reference keeps them (never scored)
        return "Q: " + row["question"] + ANSWER_MARKER, " " + final + "\n"
    check_task(task)
    choices = "\n".join(f"({label}) {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
    return "Q: " + row["question"] + "\n" + choices + ANSWER_MARKER, " " + row["answerKey"].strip() + "\n"
