"""Command-line pieces every model-reading command shares (``quietstar-eval``, ``-inspect``, ``-heldout``):
the model arguments, the thought settings they may override, and loading with a one-line error."""

from __future__ import annotations

import argparse
import sys

import torch

from .loading import ACCEPTED, ModelSpecError, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"the model to read: {ACCEPTED}")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--base-model", default=None, help="the base model of a LoRA adapter folder given as --model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--thought-temperature", type=float, default=None,
                        help="thoughts' sampling temperature (default: the model's; 1.0 as in the paper, 0 = greedy)")
    parser.add_argument("--n-thought-tokens", type=int, default=None, help="thought length N (default: the model's)")


def thought_overrides(args: argparse.Namespace) -> dict:
    """The thought settings given on the command line (those left unset keep the model's)."""
    return {name: getattr(args, name) for name in ("thought_temperature", "n_thought_tokens") if getattr(args, name) is not None}


def load_for_evaluation(spec: str, *, tokenizer: str | None = None, device: str = "cpu", base_model: str | None = None,
                        thought: dict | None = None, prog: str = "quietstar"):
    """``load_model`` in eval mode on ``device``; a spec that cannot load ends the command with one line."""
    try:
        model, tok = load_model(spec, thought=thought, tokenizer=tokenizer, base_model=base_model)
    except ModelSpecError as err:
        sys.exit(f"{prog}: {err}")
    return model.to(device).eval(), tok


def load_from_args(args: argparse.Namespace, prog: str):
    return load_for_evaluation(args.model, tokenizer=args.tokenizer, device=args.device, base_model=args.base_model,
                               thought=thought_overrides(args), prog=prog)
