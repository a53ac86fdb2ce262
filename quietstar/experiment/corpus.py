"""The experiment's text: generated math problems (CPU, offline) or the first documents of a dataset
(OpenWebMath on a GPU machine), split into disjoint training and held-out parts written to files.

A dataset corpus streams the first ``n_heldout + n_train`` documents: the first ``n_heldout`` are held
out, the rest train, minus any whose text (whitespace-normalised) equals a held-out document's, so the
split is disjoint by position and by check. Files, not a live stream, feed the runs, so every arm and
seed trains on exactly the same documents in the same order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..training.config import ConfigError, DataConfig
from .math_text import write_corpus

GENERATED = "generated"


@dataclass
class CorpusConfig:
    # "generated": seeded math problems with worked solutions (math_text.py). Otherwise a dataset as
    # data.path takes it: a hub name (e.g. open-web-math/open-web-math, streamed) or a local file.
    source: str = GENERATED
    name: str | None = None  # dataset config name
    split: str = "train"
    text_field: str = "text"
    n_train: int = 3000  # training documents (problems when generated)
    n_heldout: int = 200  # held-out documents: disjoint from training
    seed: int = 0  # the generator's seed (generated only)


def check_corpus(cfg: CorpusConfig) -> None:
    if cfg.n_train < 1 or cfg.n_heldout < 1:
        raise ConfigError(f"corpus.n_train and corpus.n_heldout must be >= 1, got {cfg.n_train} and {cfg.n_heldout}")


def _fingerprint(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def write_dataset_corpus(cfg: CorpusConfig, out_dir: str | Path) -> dict[str, Path]:
    """train.jsonl and heldout.txt from the first documents of ``cfg.source``; returns their paths."""
    from ..training.data import load_documents

    data = DataConfig(path=cfg.source, name=cfg.name, split=cfg.split, text_field=cfg.text_field,
                      max_documents=cfg.n_heldout + cfg.n_train)
    texts = [row[cfg.text_field] for row in load_documents(data, streaming=True)]
    if len(texts) <= cfg.n_heldout:
        raise ConfigError(f"corpus {cfg.source!r} has {len(texts)} documents: too few for {cfg.n_heldout} held out "
                          "and some to train on; lower corpus.n_heldout")
    heldout = texts[: cfg.n_heldout]
    held = {_fingerprint(t) for t in heldout}
    train = [t for t in texts[cfg.n_heldout :] if _fingerprint(t) not in held]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.txt"}
    paths["train"].write_text("".join(json.dumps({"text": t}) + "\n" for t in train), encoding="utf-8")
    paths["heldout"].write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
    return paths


def prepare_corpus(cfg: CorpusConfig, out_dir: str | Path) -> dict[str, Path]:
    """The experiment's files: ``train``, ``heldout`` and, for generated text, ``heldout_gsm8k`` (its problems
    in the GSM8K format, for the paper's metric)."""
    check_corpus(cfg)
    if cfg.source == GENERATED:
        return write_corpus(out_dir, cfg.n_train, cfg.n_heldout, cfg.seed)
    return write_dataset_corpus(cfg, out_dir)
