"""Helpers of the quietstar lm-eval tasks: the reference's CommonsenseQA prompt and the paper's
renormalised letter probability (softmax of the five letters' log-likelihoods at the answer token)."""

import json
import math
import os

LETTERS = ["A", "B", "C", "D", "E"]


def doc_to_text(doc):
    choices = "\n".join(f"({label}) {text}" for label, text in zip(doc["choices"]["label"], doc["choices"]["text"]))
    return "Q: " + doc["question"] + "\n" + choices + "\nA:"


def doc_to_target(doc):
    return LETTERS.index(doc["answerKey"].strip())


def process_results(doc, results):
    lls = [ll for ll, _ in results]
    top = max(lls)
    probs = [math.exp(ll - top) for ll in lls]
    gold = doc_to_target(doc)
    return {"paper_score": probs[gold] / sum(probs), "acc": float(lls.index(top) == gold)}


def sample_dataset(**kwargs):
    import datasets

    path = os.path.join(os.path.dirname(__file__), "..", "..", "data", "commonsense_qa_sample.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"validation": datasets.Dataset.from_list(rows)}
