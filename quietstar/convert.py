"""Convert a checkpoint of the official Quiet-STaR code into a :class:`QuietStarForCausalLM`.

    quietstar-convert ezelikman/quietstar-8-ahead runs/quietstar-8-ahead --n-ahead 8 --tokenizer mistralai/Mistral-7B-v0.1

The official code (github ezelikman/quiet-star, ``modeling_mistral.py``) patches transformers 4.37's
``MistralForCausalLM``; a checkpoint it saves is a Mistral checkpoint plus a few tensors:

==============================  ==========  ===============================================
official key                    shape       here
==============================  ==========  ===============================================
``model.*``, ``lm_head.weight``  Mistral's   ``base_lm.model.*``, ``base_lm.lm_head.weight``
``start_embedding``             ``[2, H]``  row 0 -> ``delimiter_embeddings[0]``
``end_embedding``               ``[2, H]``  row 0 -> ``delimiter_embeddings[1]``
``talk_head.0.{0,2,4}.*``       the MLP     ``mixing_head.mlp.{0,2,4}.*``
==============================  ==========  ===============================================

Both codes store the delimiter vectors divided by 100 (the official ``embedding_scale``), so with
our default ``embedding_scale`` the tensors are copied bit for bit. Row 1 of the official
``start_embedding`` / ``end_embedding`` is a log standard deviation read only in its
``use_reparam_for_thought_embeddings`` mode, which the paper's runs leave off; it is dropped.

Delimiter ids: the official code looks ``<|startthought|>`` / ``<|endthought|>`` up by name in its
tokenizer, so they are read by name from the tokenizer saved with the checkpoint (any order). A base
tokenizer without them (Mistral's) gets them appended as the official scripts do, start then end:
the table's last two rows (32000, 32001 of Mistral-7B's 32002). With no tokenizer at all that order
is assumed, with a warning.

Thought lengths are not in the checkpoint: the official ``n_ahead`` and ``n_ahead_talk`` are model
attributes the scripts set after loading, never saved. ``config.json`` holds only ``max_thoughts``,
set at load time to ``n_ahead + n_ahead_talk + 1`` with the loading script's ``n_ahead_talk`` (4 in
``quiet-star-train.py``, 1 in ``zero-shotcot-eval.py``), so it cannot tell ``n_ahead`` 8 with 1 from
5 with 4: ``n_ahead`` must be given. It counts the base step, the start token, the thought tokens
and the end token, so N = ``n_ahead - 3``; ``n_ahead_talk`` (default 4, the training script's) is K.
The released ``ezelikman/quietstar-8-ahead`` is 8-ahead: ``--n-ahead 8``, N = 5.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from .official_checkpoint import (
    ConversionError,
    has_tokenizer,
    local_folder,
    official_delimiter_ids,
    read_official_config,
    read_official_weights,
)

# The one head architecture the paper trained (the official MistralConfig's defaults, set again by
# quiet-star-train.py): the weighted mixing MLP over [h_base ; h_thought].
PAPER_HEAD_FLAGS = {
    "use_weighted_talk_head": True,
    "use_concat_talk_head": True,
    "use_complex_talk_head": True,
    "use_shallow_talk": False,
    "merged_lm_and_talk_heads": False,
    "merged_talk_heads": True,
    "merged_lm_and_think_heads": True,
    "use_shallow_think": True,
    "use_complex_think_head": False,
}
OFFICIAL_ONLY_CONFIG_KEYS = {*PAPER_HEAD_FLAGS, "max_thoughts"}
OFFICIAL_EMBEDDING_SCALE = 100.0
# Non-persistent buffers that older transformers versions wrote into Mistral checkpoints.
IGNORED_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
OFFICIAL_HEAD_KEYS = {
    "talk_head.0.0.weight": "mixing_head.mlp.0.weight",
    "talk_head.0.0.bias": "mixing_head.mlp.0.bias",
    "talk_head.0.2.weight": "mixing_head.mlp.2.weight",
    "talk_head.0.2.bias": "mixing_head.mlp.2.bias",
    "talk_head.0.4.weight": "mixing_head.mlp.4.weight",
}
DELIMITER_KEY = "base_lm.model.embed_tokens.delimiter_embeddings"


# ---------------------------------------------------------------------- config


def quietstar_config_from_official(
    official_config: dict,
    *,
    n_ahead: int | None = None,
    n_ahead_talk: int = 4,
    start_thought_token_id: int | None = None,
    end_thought_token_id: int | None = None,
    **thought_kwargs,
):
    """The :class:`QuietStarConfig` matching an official ``config.json`` (see the module docstring).

    ``n_ahead`` is required (config.json does not record it); the delimiter ids default, with a
    warning, to the table's last two rows in the official scripts' order."""
    from transformers import MistralConfig

    from .configuration import QuietStarConfig

    cfg = dict(official_config)
    _check_paper_architecture(cfg)
    _require_thought_lengths(cfg, n_ahead, n_ahead_talk)
    # max_thoughts is never read by the official model; it only tells the largest n_ahead it was loaded with.
    max_thoughts = cfg.get("max_thoughts")
    if max_thoughts is not None and int(max_thoughts) < n_ahead + 2:
        warnings.warn(
            f"config.json's max_thoughts = {max_thoughts} says the checkpoint was loaded with n_ahead <= "
            f"{int(max_thoughts) - 2} (max_thoughts = n_ahead + n_ahead_talk + 1, n_ahead_talk >= 1), not {n_ahead}; "
            "converting with the n_ahead given",
            stacklevel=2,
        )
    vocab = int(cfg["vocab_size"])
    if start_thought_token_id is None and end_thought_token_id is None:
        warnings.warn(
            f"no tokenizer: assuming the official scripts' order, <|startthought|> = {vocab - 2} and <|endthought|> = "
            f"{vocab - 1} (the table's last two rows); if the checkpoint's tokenizer added them in another order, pass "
            "that tokenizer (--tokenizer)",
            stacklevel=2,
        )
        start_thought_token_id, end_thought_token_id = vocab - 2, vocab - 1
    for name, token_id in (("<|startthought|>", start_thought_token_id), ("<|endthought|>", end_thought_token_id)):
        if token_id is None or not 0 <= token_id < vocab:
            raise ConversionError(f"{name} has id {token_id}, outside the checkpoint's {vocab}-row vocabulary")

    base = {k: v for k, v in cfg.items() if k not in OFFICIAL_ONLY_CONFIG_KEYS}
    for key in ("_name_or_path", "architectures", "transformers_version"):
        base.pop(key, None)
    return QuietStarConfig(
        base_config=MistralConfig.from_dict(base),
        n_thought_tokens=n_ahead - 3,
        n_talk_tokens=n_ahead_talk,
        start_thought_token_id=start_thought_token_id,
        end_thought_token_id=end_thought_token_id,
        **thought_kwargs,
    )


def _check_paper_architecture(cfg: dict) -> None:
    if cfg.get("model_type") != "mistral":
        raise ConversionError(
            f"config.json has model_type {cfg.get('model_type')!r}; the official Quiet-STaR code patches Mistral only. "
            "To wrap another model use QuietStarForCausalLM.from_base"
        )
    for flag, paper_value in PAPER_HEAD_FLAGS.items():
        if flag in cfg and cfg[flag] != paper_value:
            raise ConversionError(
                f"config.json sets {flag} = {cfg[flag]!r}; only the paper's mixing head ({flag} = {paper_value!r}, "
                "a weighted MLP over [base ; thought] hidden states) can be converted"
            )
    if cfg.get("tie_word_embeddings"):
        raise ConversionError("config.json ties the input and output embeddings; the official Mistral checkpoints do not")


def _require_thought_lengths(cfg: dict, n_ahead: int | None, n_ahead_talk: int) -> None:
    max_thoughts = cfg.get("max_thoughts")
    if n_ahead is None:
        fits = ""
        if max_thoughts is not None:  # both official scripts set max_thoughts = n_ahead + n_ahead_talk + 1
            readings = [f"n_ahead {int(max_thoughts) - talk - 1} with {script}'s n_ahead_talk {talk}"
                        for talk, script in ((1, "zero-shotcot-eval.py"), (4, "quiet-star-train.py"))
                        if int(max_thoughts) - talk - 1 >= 4]
            fits = f"; its max_thoughts = {max_thoughts} (n_ahead + n_ahead_talk + 1 when it was loaded) fits " + (
                " as well as ".join(readings) or "no n_ahead >= 4")
        raise ConversionError(
            f"config.json does not record n_ahead (the official code keeps it outside the checkpoint){fits}. "
            "Pass --n-ahead (n_ahead= in Python): --n-ahead 8 for the released ezelikman/quietstar-8-ahead, the value "
            "zero-shotcot-eval.py loads it with (N = 8 - 3 = 5 thought tokens between the delimiters)"
        )
    if n_ahead < 4 or n_ahead_talk < 1:
        raise ConversionError(
            f"n_ahead = {n_ahead} and n_ahead_talk = {n_ahead_talk}: need n_ahead >= 4 (start, >= 1 thought token, end) "
            "and n_ahead_talk >= 1"
        )


# ---------------------------------------------------------------------- weights


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a QuietStarForCausalLM built from ``config``, by name, without allocating it."""
    from .modeling import QuietStarForCausalLM

    with torch.device("meta"):
        model = QuietStarForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def map_official_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Official names -> ours, every key and shape checked against ``config``; no tensor is changed
    except the delimiter rows when ``config.embedding_scale`` is not the official 100."""
    expected = expected_shapes(config)
    mapped, unknown = {}, []
    delimiters = {}
    for key, tensor in state_dict.items():
        if key in ("start_embedding", "end_embedding"):
            delimiters[key] = tensor
        elif key in OFFICIAL_HEAD_KEYS:
            mapped[OFFICIAL_HEAD_KEYS[key]] = tensor
        elif key.startswith("model.") or key == "lm_head.weight":
            if IGNORED_KEYS.match(key):
                continue
            mapped["base_lm." + key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"unknown tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all): an official "
            "checkpoint holds model.*, lm_head.weight, start_embedding, end_embedding and talk_head.0.{0,2,4}.*; "
            "was it saved by another version of the code?"
        )
    H = config.base_config.hidden_size
    for key in ("start_embedding", "end_embedding"):
        if key not in delimiters:
            raise ConversionError(f"missing tensor {key!r} [2, {H}]: not a checkpoint of the official Quiet-STaR code")
        if tuple(delimiters[key].shape) != (2, H):
            raise ConversionError(
                f"{key} has shape {tuple(delimiters[key].shape)}, expected [2, {H}] (row 0: the vector / 100, row 1: a log std)"
            )
    rows = torch.stack([delimiters["start_embedding"][0], delimiters["end_embedding"][0]])  # [2, H], stored / 100
    if config.embedding_scale != OFFICIAL_EMBEDDING_SCALE:
        rows = (rows.float() * (OFFICIAL_EMBEDDING_SCALE / config.embedding_scale)).to(rows.dtype)
    mapped[DELIMITER_KEY] = rows

    missing = sorted(set(expected) - set(mapped))
    if missing:
        official = [_official_name(k) for k in missing]
        raise ConversionError(
            f"missing tensors {official[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); "
            "the checkpoint is incomplete or config.json does not describe it (num_hidden_layers?)"
        )
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise ConversionError(
            f"tensors {[_official_name(k) for k in extra[:5]]} do not exist in the model config.json describes "
            "(num_hidden_layers, attention biases?); fix config.json or the checkpoint"
        )
    for key, shape in expected.items():
        if tuple(mapped[key].shape) != shape:
            raise ConversionError(
                f"{_official_name(key)} has shape {tuple(mapped[key].shape)}, but config.json (hidden_size, vocab_size, "
                f"heads, intermediate_size) implies {shape}; the config and the weights disagree"
            )
    return mapped


def _official_name(ours: str) -> str:
    for official, mine in OFFICIAL_HEAD_KEYS.items():
        if mine == ours:
            return official
    if ours == DELIMITER_KEY:
        return "start_embedding/end_embedding"
    return ours.removeprefix("base_lm.")


# ---------------------------------------------------------------------- conversion


def convert_official_checkpoint(
    path_or_state_dict,
    *,
    config: dict | str | os.PathLike | None = None,
    n_ahead: int | None = None,
    n_ahead_talk: int = 4,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    **thought_kwargs,
):
    """A :class:`QuietStarForCausalLM` holding an official Quiet-STaR checkpoint's weights.

    ``path_or_state_dict``: a folder saved by the official code (or a hub id), or its state dict
    with ``config`` (its config.json as a dict or a path). ``n_ahead`` is required: the checkpoint
    does not record it (8 for ezelikman/quietstar-8-ahead); N = n_ahead - 3, K = ``n_ahead_talk``.
    The delimiter ids are read by name from ``tokenizer`` (a base tokenizer without them gets them
    appended, as the official scripts did); with no tokenizer they are assumed to be the table's last
    two rows, start then end, with a warning.
    ``dtype`` defaults to the checkpoint's; then the model holds the loaded tensors themselves (no
    copy: a bf16 Mistral-7B needs about 15 GB of memory). Other keywords are :class:`QuietStarConfig` fields
    (``n_passes``, ``thought_attn_implementation``, ...). Raises :class:`ConversionError` naming
    the tensor or setting it does not understand.
    """
    from .modeling import QuietStarForCausalLM

    if isinstance(path_or_state_dict, dict):
        if config is None:
            raise ConversionError("a state dict needs its config: pass config= (config.json as a dict or a path)")
    elif config is None:
        config = read_official_config(path_or_state_dict)
    official_config = config if isinstance(config, dict) else json.loads(Path(config).read_text(encoding="utf-8"))
    ids = {}
    if tokenizer is not None:
        start_id, end_id = official_delimiter_ids(tokenizer, int(official_config.get("vocab_size", -1)))
        ids = {"start_thought_token_id": start_id, "end_thought_token_id": end_id}
    qs_config = quietstar_config_from_official(
        official_config, n_ahead=n_ahead, n_ahead_talk=n_ahead_talk, **ids, **thought_kwargs
    )
    # the weights are read (a hub checkpoint downloaded) only once config.json and the options are known good
    state_dict = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_official_weights(path_or_state_dict)
    mapped = map_official_state_dict(state_dict, qs_config)
    if dtype is None:
        dtype = mapped["base_lm.lm_head.weight"].dtype
    model = QuietStarForCausalLM.from_pretrained(None, config=qs_config, state_dict=mapped, dtype=dtype)
    return model.eval()


def save_atomically(model, destination: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then rename it to ``destination``."""
    destination = Path(destination)
    check_destination(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def check_destination(destination: str | os.PathLike, overwrite: bool = False) -> None:
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise ConversionError(f"{str(destination)!r} exists and is not empty; choose another DST or pass --overwrite")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quietstar-convert",
        description="Convert a checkpoint of the official Quiet-STaR code (e.g. ezelikman/quietstar-8-ahead) "
        "into a QuietStarForCausalLM folder that quietstar-eval and from_pretrained load.",
    )
    p.add_argument("src", help="folder saved by the official code, or a hub id")
    p.add_argument("dst", help="output folder (save_pretrained layout, safetensors)")
    p.add_argument("--n-ahead", type=int, default=None,
                   help="official n_ahead (N = n_ahead - 3), required: the checkpoint does not record it (8 for the "
                        "released model)")
    p.add_argument("--n-ahead-talk", type=int, default=4,
                   help="official n_ahead_talk = K, used when training further (default 4, the training script's)")
    p.add_argument("--n-passes", type=int, default=2, help="thoughts per position when training further (default 2)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to read the delimiter ids from by name (or, if it lacks them, to append them to as the "
                        "official scripts did) and to save beside the model (mistralai/Mistral-7B-v0.1 for the released "
                        "model); default: the one saved in SRC, if any")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # cheap checks first: a hub checkpoint is downloaded only when the options fit it
        _require_thought_lengths(read_official_config(args.src), args.n_ahead, args.n_ahead_talk)
        check_destination(args.dst, args.overwrite)
        src = local_folder(args.src)
        tokenizer = None
        tokenizer_source = args.tokenizer if args.tokenizer is not None else (src if has_tokenizer(src) else None)
        if tokenizer_source is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        model = convert_official_checkpoint(
            src, n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk, n_passes=args.n_passes,
            tokenizer=tokenizer, dtype=dtype,
        )
        out = save_atomically(model, args.dst, tokenizer, overwrite=args.overwrite)
    except (ConversionError, ValueError, OSError) as error:
        print(f"quietstar-convert: error: {error}", file=sys.stderr)
        return 2
    cfg = model.config
    print(
        f"wrote {out}: N = {cfg.n_thought_tokens} thought tokens, K = {cfg.n_talk_tokens}, "
        f"delimiter ids ({cfg.start_thought_token_id}, {cfg.end_thought_token_id})"
    )
    if tokenizer is None:
        print("no tokenizer saved: quietstar-eval needs one with the delimiters; re-run with --tokenizer (mistralai/Mistral-7B-v0.1 for the released model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
