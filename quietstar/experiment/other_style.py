"""Held-out math text in another style than the training corpus, that no generator here wrote.

The generated corpus (math_text.py) is templated: a model can learn its phrasing as well as its
arithmetic, and a held-out set from the same generator rewards both. CHAMP (Mao, Kim & Zhou 2024,
"CHAMP: A Competition-level Dataset for Fine-Grained Analyses of LLMs' Mathematical Reasoning
Capabilities"; MIT licence; `pip install champ-dataset`, offline) has 270 competition problems with
human-written step-by-step solutions. Only the problem statement, the reference solution's steps and
the final answer are used: the package also ships model-written solutions (its ``fws_annotations``),
which are left out.

    text = champ_text()                 # "Problem: ...\\nSolution: ...\\nAnswer: ...\\n\\n" per problem
    text = other_style_text("champ")    # or a UTF-8 file's text
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from ..training.config import ConfigError

CHAMP = "champ"


def format_problem(problem: str, steps: list[str], answer: str) -> str:
    return f"Problem: {problem.strip()}\nSolution: {' '.join(s.strip() for s in steps)}\nAnswer: {answer.strip()}\n"


def champ_problems() -> list[dict]:
    """CHAMP's problems in their identifier order: ``{"id", "problem", "steps", "answer"}`` (a fresh list)."""
    return [dict(p) for p in _champ_problems()]


@functools.lru_cache(maxsize=1)
def _champ_problems() -> tuple[dict, ...]:  # the package parses 72 MB of JSON: once per process
    try:
        import champ_dataset
    except ImportError as err:
        raise ConfigError("heldout.other_style 'champ' needs the CHAMP dataset package: pip install champ-dataset "
                          "(or pip install -e '.[experiment]'); or set heldout.other_style to a text file or null") from err
    dataset = champ_dataset.load("v0")
    return tuple({"id": ident, "problem": p.text, "steps": [s.text for s in p.solution.steps], "answer": p.answer}
                 for ident, p in sorted(dataset.problems.items()))


def champ_text(limit: int | None = None, seed: int = 0) -> str:
    """CHAMP's problems with their human-written solutions, one block each, blank-line separated, in a
    fixed shuffled order (``seed``): a scorer that reads only the first windows sees every category."""
    problems = champ_problems()
    random.Random(seed).shuffle(problems)
    problems = problems[:limit]
    return "\n".join(format_problem(p["problem"], p["steps"], p["answer"]) for p in problems)


def other_style_text(source: str) -> str:
    """``"champ"`` or the path of a UTF-8 text file."""
    if source == CHAMP:
        return champ_text()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"heldout.other_style {source!r} is neither 'champ' nor a text file; give one or null (skip)")
    return path.read_text(encoding="utf-8")
