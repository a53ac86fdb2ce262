"""Reading a checkpoint folder (or hub id) saved by the official Quiet-STaR code: its config.json,
its weights (one file or shards, safetensors or .bin) and the tokenizer saved beside them, if any."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class ConversionError(ValueError):
    """The source is not a checkpoint of the official code that this converter understands."""


def read_official_config(path: str | os.PathLike) -> dict:
    """config.json of a saved official checkpoint folder or hub id (only that file is downloaded)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{str(folder)!r} has no config.json; point SRC at the folder the official code saved")
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(_hub_id(path), "config.json"))
    return json.loads(config_file.read_text(encoding="utf-8"))


def read_official_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict (on CPU) of a saved official checkpoint folder or hub id."""
    return _read_weights(local_folder(path))


def local_folder(path) -> Path:
    """``path`` itself when it is a folder; a hub id is downloaded (config, weights, tokenizer files)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    repo_id = _hub_id(path)
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model"]
    if not _has_safetensors_on_hub(repo_id):
        patterns += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _hub_id(path) -> str:
    text = str(path)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ConversionError(f"checkpoint {text!r} is not a folder; give a saved checkpoint folder or a hub id (owner/name)")
    return text


def _has_safetensors_on_hub(repo_id: str) -> bool:
    try:
        from huggingface_hub import list_repo_files

        return any(f.endswith(".safetensors") for f in list_repo_files(repo_id))
    except Exception:  # offline: whatever the cache holds is fetched below
        return True


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", _load_bin)):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ConversionError(f"{index_name} in {str(folder)!r} names shards that are absent: {missing}")
            state = {}
            for shard in shards:
                state.update(loader(str(folder / shard)))
            return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(str(folder / "pytorch_model.bin"))
    raise ConversionError(
        f"no weights in {str(folder)!r}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def has_tokenizer(folder: Path) -> bool:
    """Whether a tokenizer was saved beside the weights (the official scripts do not save one; users may)."""
    return (Path(folder) / "tokenizer_config.json").is_file()


def official_delimiter_ids(tokenizer, vocab_size: int) -> tuple[int, int]:
    """(start, end) ids of ``<|startthought|>`` / ``<|endthought|>`` found by name, as the official code
    finds them (``tokenizer.convert_tokens_to_ids``), in whatever order they were added.

    A tokenizer with neither (the base model's own) gets both appended in the official scripts'
    order, which must land on the table's last two rows, where those scripts put them."""
    from .configuration import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN
    from .modeling import add_thought_tokens

    found = {token: _token_id(tokenizer, token) for token in (START_THOUGHT_TOKEN, END_THOUGHT_TOKEN)}
    if None in found.values() and set(found.values()) != {None}:
        present, absent = sorted(found, key=lambda token: found[token] is None)
        raise ConversionError(
            f"the tokenizer has {present} (id {found[present]}) but not {absent}: it is neither the checkpoint's "
            "tokenizer (both delimiters) nor a base tokenizer (neither); pass the tokenizer saved with the checkpoint, "
            "or the base model's (--tokenizer mistralai/Mistral-7B-v0.1 for the released model)"
        )
    if None in found.values():
        ids = add_thought_tokens(tokenizer)  # appended in the order the official scripts add them
        if ids != (vocab_size - 2, vocab_size - 1):
            raise ConversionError(
                f"the tokenizer puts <|startthought|>, <|endthought|> at ids {ids}, but the official training "
                f"script appended them as the last two rows of the {vocab_size}-row table ({vocab_size - 2}, "
                f"{vocab_size - 1}); pass the base model's own tokenizer (mistralai/Mistral-7B-v0.1 for the "
                "released model) or the one saved with the checkpoint"
            )
        return ids
    for token, token_id in found.items():
        if not 0 <= token_id < vocab_size:
            raise ConversionError(
                f"the tokenizer has {token} at id {token_id}, outside the checkpoint's {vocab_size}-row table: it is "
                "not the checkpoint's tokenizer; pass the one saved with the checkpoint or the base model's"
            )
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the checkpoint's {vocab_size}-row table: it is "
            "not the checkpoint's tokenizer; pass the one saved with the checkpoint or the base model's"
        )
    return found[START_THOUGHT_TOKEN], found[END_THOUGHT_TOKEN]


def _token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:  # unknown names map to <unk>
        return None
    return int(token_id)
