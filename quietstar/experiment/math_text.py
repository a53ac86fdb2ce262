"""Math text with worked solutions, generated offline and reproducibly (a stand-in for OpenWebMath).

    python -m quietstar.experiment.math_text --out data/math --train 4000 --heldout 400 --seed 0

Each document is one problem and its solution in words and equations: multi-step arithmetic, or a
word problem (shopping, sharing, rates, ages, savings) in one of several phrasings, 1-4 steps. The
tokens that follow "=" are the hard, predictable-by-thinking tokens the paper's argument is about.

Splits are disjoint by construction: a problem's split is decided by a hash of its canonical form
(kind and numbers, not its wording), so the same problem can never appear in both, whatever the
phrasing; :func:`write_corpus` also checks it. Files written: ``train.txt``, ``heldout.txt`` (documents
separated by a blank line) and ``heldout_gsm8k.jsonl`` (the held-out problems in GSM8K's hub format,
for the paper's metric: ``quietstar-eval --tasks gsm8k --source heldout_gsm8k.jsonl``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Problem", "generate", "write_corpus", "HELDOUT_SHARE"]

HELDOUT_SHARE = 10  # one problem in this many (by canonical hash) belongs to the held-out split

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Nora", "Eli", "Ruth", "Omar", "Lena", "Raj", "Kate"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins", "stamps"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    kind: str
    canonical: tuple  # kind and numbers: what decides the split
    question: str
    steps: tuple[str, ...]  # one sentence per step, each with its equation
    answer: int

    @property
    def split(self) -> str:
        digest = hashlib.sha256(repr(self.canonical).encode()).digest()
        return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_SHARE == 0 else "train"

    def document(self) -> str:
        return f"Problem: {self.question}\nSolution: {' '.join(self.steps)}\nThe answer is {self.answer}."

    def gsm8k_row(self) -> dict:
        return {"question": self.question, "answer": "\n".join(self.steps) + f"\n#### {self.answer}"}


def _chain(rng: random.Random) -> Problem:
    """A chain of 2-4 operations, solved left to right."""
    n_ops = rng.randint(2, 4)
    value = rng.randint(2, 60)
    terms, steps, numbers = [str(value)], [], [value]
    for i in range(n_ops):
        op = rng.choice("+-*" if value < 200 else "+-")
        b = rng.randint(2, 9) if op == "*" else rng.randint(1, 50)
        if op == "-" and b > value:
            op = "+"
        new = OPS[op](value, b)
        lead = rng.choice(["First", "To begin"]) if i == 0 else rng.choice(["Then", "Next", "Now"])
        steps.append(f"{lead}, {value} {op} {b} = {new}.")
        terms.append(f"{op} {b}")
        numbers += [op, b]
        value = new
    expression = " ".join(terms)
    question = rng.choice([f"Compute {expression}, working left to right.", f"What is {expression}, left to right?",
                           f"Evaluate {expression} step by step, in order."])
    return Problem("chain", ("chain", *numbers), question, tuple(steps), value)


def _shopping(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price, extra = rng.randint(2, 12), rng.randint(2, 15), rng.randint(1, 20)
    cost = count * price
    question = rng.choice([
        f"{name} buys {count} {item} at ${price} each and a bag for ${extra}. How much does {name} spend?",
        f"Each of the {item} costs ${price}. {name} takes {count} of them and also pays ${extra} for a bag. What is the total cost?",
    ])
    steps = (f"The {item} cost {count} * {price} = {cost} dollars.", f"With the bag, {cost} + {extra} = {cost + extra} dollars.")
    return Problem("shopping", ("shopping", count, price, extra), question, steps, cost + extra)


def _sharing(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, kept = rng.randint(2, 9), rng.randint(2, 12), rng.randint(0, 9)
    total = friends * each + kept
    question = rng.choice([
        f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally among {friends} friends. How many does each friend get?",
        f"There are {total} {item}. After setting aside {kept}, they are split evenly between {friends} children. How many {item} does each child get?",
    ])
    steps = (f"After keeping {kept}, {total} - {kept} = {total - kept} are shared.",
             f"Each gets {total - kept} / {friends} = {each}.")
    return Problem("sharing", ("sharing", total, kept, friends), question, steps, each)


def _rate(rng: random.Random) -> Problem:
    speed, hours, back = rng.randint(20, 90), rng.randint(2, 8), rng.randint(1, 3)
    out_leg, back_leg = speed * hours, speed * back
    question = rng.choice([
        f"A train travels at {speed} miles per hour for {hours} hours, then {back} more hours at the same speed. How far does it go?",
        f"A cyclist rides {speed} km each hour. She rides {hours} hours in the morning and {back} in the evening. What distance does she cover?",
    ])
    steps = (f"In the first part it covers {speed} * {hours} = {out_leg}.", f"Then {speed} * {back} = {back_leg} more.",
             f"In total {out_leg} + {back_leg} = {out_leg + back_leg}.")
    return Problem("rate", ("rate", speed, hours, back), question, steps, out_leg + back_leg)


def _ages(rng: random.Random) -> Problem:
    a, b = rng.sample(NAMES, 2)
    age, gap, years = rng.randint(5, 40), rng.randint(2, 30), rng.randint(2, 20)
    question = rng.choice([
        f"{a} is {age} years old. {b} is {gap} years older than {a}. How old will {b} be in {years} years?",
        f"{b} is {gap} years older than {a}, who is {age}. What will {b}'s age be {years} years from now?",
    ])
    steps = (f"{b} is {age} + {gap} = {age + gap} now.", f"In {years} years, {age + gap} + {years} = {age + gap + years}.")
    return Problem("ages", ("ages", age, gap, years), question, steps, age + gap + years)


def _savings(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    start, weekly, weeks, spent = rng.randint(0, 50), rng.randint(3, 25), rng.randint(2, 10), rng.randint(1, 30)
    saved = weekly * weeks
    question = rng.choice([
        f"{name} has ${start} and saves ${weekly} a week for {weeks} weeks, then spends ${spent}. How much is left?",
        f"Starting with ${start}, {name} puts away ${weekly} every week. After {weeks} weeks {name} buys a game for ${spent}. How much money remains?",
    ])
    steps = (f"Savings: {weekly} * {weeks} = {saved}.", f"With the start, {start} + {saved} = {start + saved}.",
             f"After buying, {start + saved} - {spent} = {start + saved - spent}.")
    return Problem("savings", ("savings", start, weekly, weeks, spent), question, steps, start + saved - spent)


KINDS = (_chain, _shopping, _sharing, _rate, _ages, _savings)


def generate(n: int, split: str, seed: int) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "heldout"), deterministic for ``seed``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"quietstar-math-{seed}-{split}")
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} problems; ask for fewer")
        problem = rng.choice(KINDS)(rng)
        if problem.split == split and problem.canonical not in seen:
            seen.add(problem.canonical)
            problems.append(problem)
    return problems


def write_corpus(out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0) -> dict[str, Path]:
    """Write train.txt, heldout.txt and heldout_gsm8k.jsonl under ``out_dir``; returns their paths."""
    train, heldout = generate(n_train, "train", seed), generate(n_heldout, "heldout", seed)
    overlap = {p.canonical for p in train} & {p.canonical for p in heldout}
    if overlap:  # cannot happen by construction (the hash decides the split); checked all the same
        raise AssertionError(f"{len(overlap)} problems are in both splits, e.g. {next(iter(overlap))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.txt", "heldout": out / "heldout.txt", "heldout_gsm8k": out / "heldout_gsm8k.jsonl"}
    paths["train"].write_text("\n\n".join(p.document() for p in train) + "\n", encoding="utf-8")
    paths["heldout"].write_text("\n\n".join(p.document() for p in heldout) + "\n", encoding="utf-8")
    paths["heldout_gsm8k"].write_text("".join(json.dumps(p.gsm8k_row()) + "\n" for p in heldout), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m quietstar.experiment.math_text", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=4000, help="training problems")
    p.add_argument("--heldout", type=int, default=400, help="held-out problems")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, path in write_corpus(args.out, args.train, args.heldout, args.seed).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
