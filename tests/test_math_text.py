"""The offline math-text generator: deterministic for a seed, splits disjoint by construction and by check."""

import json

import pytest

from quietstar.evaluation.data import load_examples
from quietstar.experiment import math_text


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b = math_text.generate(60, "train", seed=3), math_text.generate(60, "train", seed=3)
    assert [p.document() for p in a] == [p.document() for p in b]
    assert [p.document() for p in a] != [p.document() for p in math_text.generate(60, "train", seed=4)]
    assert len({p.kind for p in a}) == len(math_text.KINDS)  # every kind of problem appears


def test_splits_are_disjoint_and_solutions_are_right():
    train, heldout = math_text.generate(1500, "train", seed=0), math_text.generate(150, "heldout", seed=0)
    assert not {p.canonical for p in train} & {p.canonical for p in heldout}
    assert not {p.question for p in train} & {p.question for p in heldout}
    for p in train[:200] + heldout:
        assert p.split == ("train" if p in train[:200] else "heldout")
        for step in p.steps:  # every equation in a solution is true
            lhs, rhs = step.split(" = ")
            expr = lhs.split(", ")[-1].split()[-3:]
            a, op, b = int(expr[0]), expr[1], int(expr[2])
            value = {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b
            assert int(rhs.split()[0].rstrip(".")) == value, step
        assert p.steps[-1].split(" = ")[1].split()[0].rstrip(".") == str(p.answer)


def test_write_corpus_files_feed_training_and_the_paper_metric(tmp_path):
    paths = math_text.write_corpus(tmp_path, n_train=50, n_heldout=10, seed=1)
    train_docs = paths["train"].read_text().strip().split("\n\n")
    assert len(train_docs) == 50 and all(d.startswith("Problem: ") for d in train_docs)
    rows = [json.loads(line) for line in paths["heldout_gsm8k"].read_text().splitlines()]
    assert len(rows) == 10 and all("\n#### " in r["answer"] for r in rows)
    examples = load_examples("gsm8k", str(paths["heldout_gsm8k"]))  # the evaluation reads it as GSM8K
    assert len(examples) == 10


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        math_text.generate(3, "test", seed=0)
