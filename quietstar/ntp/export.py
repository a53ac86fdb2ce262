"""Write the thought-free student as a plain transformers checkpoint of the base architecture.

    export_student(student, "run/ntp-model", tokenizer)
    # anywhere, without quietstar installed:
    model = AutoModelForCausalLM.from_pretrained("run/ntp-model")   # LlamaForCausalLM, Qwen2ForCausalLM, ...

The checkpoint is the base model class's own ``save_pretrained`` output, so it loads, generates and
serves (vLLM, TGI, llama.cpp conversion) exactly as the base model does, at its speed.

Embedding rows. This library never grows the base model's table for the delimiters: their vectors
live in a separate 2-row parameter (quietstar/delimiters.py), and :func:`make_student` drops it. So
there are no delimiter rows to remove: ids past the table never had rows, and ids inside the table
(a tokenizer smaller than a padded table, as Qwen's) point at rows that were always the base
model's own and stay, because the base class's config (``vocab_size``) fixes the table's shape.

Tokenizer. The Quiet-STaR tokenizer carries ``<|startthought|>`` / ``<|endthought|>``; the exported
one does not (a student never saw them, and ids past the table would crash its embedding): they are
removed from the saved files and the result is reloaded to check.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..configuration import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN
from ..lora import has_lora
from .teacher import check_student

DELIMITERS = (START_THOUGHT_TOKEN, END_THOUGHT_TOKEN)


def export_student(student, save_directory, tokenizer=None, **save_kwargs) -> Path:
    """``student.save_pretrained(save_directory)`` (+ the tokenizer without the delimiters); returns the path.

    ``student``: a plain causal LM (:func:`quietstar.ntp.make_student`); ``save_kwargs`` go to
    ``save_pretrained`` (``max_shard_size``, ...).
    """
    check_student(student)
    if has_lora(student):
        raise ValueError("the student carries LoRA adapters; merge them first (peft: merge_and_unload()) "
                         "so the checkpoint is the base architecture's own weights")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(directory, **save_kwargs)
    if tokenizer is not None:
        save_tokenizer_without_delimiters(tokenizer, directory, student.get_input_embeddings().num_embeddings)
    return directory


def save_tokenizer_without_delimiters(tokenizer, directory, table_rows: int | None = None) -> None:
    """Save ``tokenizer`` to ``directory`` with the two thought delimiters removed (if it has them)."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    if any(token in tokenizer.get_added_vocab() for token in DELIMITERS):
        if not (directory / "tokenizer.json").is_file():
            raise ValueError(f"{type(tokenizer).__name__} saves no tokenizer.json, so the thought delimiters cannot be "
                             "removed from it; pass the base model's own tokenizer (without the delimiters) instead")
        _drop_added_tokens(directory / "tokenizer.json", "added_tokens")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (directory / name).is_file():
                _drop_from_config(directory / name)
    _check_saved_tokenizer(directory, table_rows)


def _is_delimiter(entry) -> bool:
    return (entry.get("content") if isinstance(entry, dict) else entry) in DELIMITERS


def _drop_added_tokens(path: Path, key: str) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data[key] = [entry for entry in data.get(key, []) if not _is_delimiter(entry)]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _drop_from_config(path: Path) -> None:
    """Delimiters out of a tokenizer_config / special_tokens_map: the added-token table and special lists."""
    data = json.loads(path.read_text(encoding="utf-8"))
    decoder = data.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        data["added_tokens_decoder"] = {k: v for k, v in decoder.items() if not _is_delimiter(v)}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(data.get(key), list):
            data[key] = [entry for entry in data[key] if not _is_delimiter(entry)]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _check_saved_tokenizer(directory: Path, table_rows: int | None) -> None:
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(directory)
    left = [token for token in DELIMITERS if token in reloaded.get_added_vocab()]
    if left:
        raise RuntimeError(f"the saved tokenizer in {directory} still has {left}; pass the base model's own tokenizer")
    if table_rows is not None and len(reloaded) > table_rows:
        raise ValueError(f"the tokenizer has {len(reloaded)} ids but the model's embedding only {table_rows} rows; "
                         "pass the tokenizer the base model was trained with")
