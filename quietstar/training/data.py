"""Training data: Hugging Face ``datasets`` -> tokens -> fixed windows of L tokens -> per-process batches.

Two sources, one contract (``next_batch()`` and ``state_dict()`` / ``position``):

- :class:`PackedDataset` (local files, ``bundled``, or a hub set without streaming): all documents
  are tokenised once, joined with EOS and cut into ``W`` windows of L tokens (the tail window is
  kept and padded, its padding masked out). The **global order** is the endless sequence of
  windows ``randperm(W, seed)``, then ``randperm(W, seed + 1)`` (epoch 1), ... It does not depend
  on the process count. Windows are consumed from it in order, ``B * world`` per global
  micro-batch: when ``c`` windows have been consumed, process ``r`` takes ``c + r*B ... c + (r+1)*B - 1``.
  The data state is ``c`` (``windows_consumed``), so a run resumed by any number of processes
  trains next exactly the windows the uninterrupted run would have trained next. Which process
  trains which window, and how many windows make one optimiser step (``B * world * grad_accum``),
  follow the new launch: keep that product (e.g. double grad_accum when halving the processes)
  and every optimiser step trains the same set of windows.
- ``data.windows: document`` replaces packing by one window per document (the reference's
  recipe), in both sources; ``data.max_documents`` keeps only the first documents. Those are a
  budget: past them the run stops (batch.py checks at start) rather than start a second epoch;
  without a budget a new epoch is announced with a warning, never silent.
- A streamed set with ``data.max_documents`` reads those documents once from the stream, then is a
  :class:`PackedDataset`: the same global order (and the same documents per step) on any process count.
- :class:`StreamingDataset` (hub sets too large to download, ``data.streaming: true`` without a
  budget): the stream
  is shuffled with a document buffer seeded by ``seed``, split across processes
  (``split_dataset_by_node``), tokenised and packed on the fly. Resuming re-reads and drops the
  windows already used (exact, but it costs a pass over the consumed part of the stream). The
  split depends on the process count, so this resume is exact only with the same count.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .config_checks import data_files


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    return int(eos)


def _pad_id(tokenizer) -> int:
    """The id that fills masked-out window tails: the tokenizer's pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def _check_text_field(column_names, cfg: DataConfig) -> None:
    if column_names is not None and cfg.text_field not in column_names:
        raise ConfigError(
            f"data.text_field {cfg.text_field!r} is not a column of {cfg.path!r}; its columns are {list(column_names)}"
        )


def load_documents(cfg: DataConfig, streaming: bool):
    """A ``datasets`` Dataset (or IterableDataset when streaming) with ``cfg.text_field``."""
    from datasets import load_dataset

    from ..assets import bundled_corpus_path

    path = str(bundled_corpus_path()) if cfg.path == "bundled" else cfg.path
    local = data_files(path)
    if local is not None:
        builder, files = local
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=files, split="train", streaming=streaming, **extra)
    else:
        ds = load_dataset(path, cfg.name, split=cfg.split, streaming=streaming)
    _check_text_field(ds.column_names, cfg)
    if cfg.max_documents is not None:  # the first documents, before any shuffling (the reference's train[:N])
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def document_window(ids: list[int], seq_len: int, pad_id: int, seed: int, index: int) -> tuple[list[int], list[int]]:
    """One L-token window of one document and its mask: a random window of a longer document (the
    start drawn from ``(seed, index)``, so resuming sees the same window), a shorter one padded."""
    if len(ids) > seq_len:
        start = int(np.random.default_rng([seed, index]).integers(0, len(ids) - seq_len + 1))
        return ids[start : start + seq_len], [1] * seq_len
    return ids + [pad_id] * (seq_len - len(ids)), [1] * len(ids) + [0] * (seq_len - len(ids))


def pack_tokens(tokens: np.ndarray, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token stream ``[T]`` -> windows ``[W, L]`` and attention masks ``[W, L]`` (tail padded and masked)."""
    n_windows = -(-len(tokens) // seq_len)
    ids = np.full(n_windows * seq_len, pad_id, dtype=np.int64)
    ids[: len(tokens)] = tokens
    mask = np.zeros(n_windows * seq_len, dtype=np.int64)
    mask[: len(tokens)] = 1
    return torch.from_numpy(ids).view(n_windows, seq_len), torch.from_numpy(mask).view(n_windows, seq_len)


class PackedDataset:
    def __init__(self, cfg: DataConfig, tokenizer, *, batch_size: int, rank: int, world_size: int, seed: int):
        ds = load_documents(cfg, streaming=cfg.streaming)  # streamed only with a budget (build_dataset)
        eos = _eos_id(tokenizer)
        pad = _pad_id(tokenizer)
        per_document = cfg.windows == "document"
        chunks = []
        for rows in ds.iter(batch_size=1000):
            texts = [t for t in rows[cfg.text_field] if isinstance(t, str) and t.strip()]
            for ids in tokenizer(texts, add_special_tokens=per_document)["input_ids"] if texts else []:
                chunks.append(document_window(ids, cfg.seq_len, pad, seed, len(chunks)) if per_document
                              else np.asarray(ids + [eos], dtype=np.int64))
        if not chunks:
            raise ConfigError(f"data.path {cfg.path!r} holds no text in field {cfg.text_field!r} (empty dataset)")
        if per_document:  # [D, L]
            self.input_ids = torch.tensor([ids for ids, _ in chunks], dtype=torch.long)
            self.attention_mask = torch.tensor([mask for _, mask in chunks], dtype=torch.long)
        else:
            self.input_ids, self.attention_mask = pack_tokens(np.concatenate(chunks), cfg.seq_len, pad)  # [W, L]
        self.n_tokens = int(self.attention_mask.sum())
        self.max_documents = cfg.max_documents  # a budget: no second epoch
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.position = 0  # global micro-batches consumed (by any process count)
        self.windows_consumed = 0  # c: windows of the global order consumed
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if epoch > 0:
                announce_epoch(epoch, f"all {len(self)} windows", self.max_documents)
            self._orders = {epoch: torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._orders[epoch]

    def sample_ids(self, consumed: int) -> list[int]:
        """Window ids of this process's batch of the global micro-batch that starts after ``consumed`` windows."""
        first = consumed + self.rank * self.batch_size
        out = []
        for flat in range(first, first + self.batch_size):
            epoch, index = divmod(flat, len(self))
            out.append(int(self._order(epoch)[index]))
        return out

    def next_batch(self) -> dict:
        ids = self.sample_ids(self.windows_consumed)
        self.windows_consumed += self.batch_size * self.world_size
        self.position += 1
        index = torch.tensor(ids)
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index], "sample_ids": ids}

    def state_dict(self) -> dict:
        return {"kind": "packed", "position": self.position, "windows_consumed": self.windows_consumed,
                "n_windows": len(self), "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows") not in (None, len(self)):
            raise ConfigError(
                f"the checkpoint's data had {state['n_windows']} windows, this data has {len(self)}; "
                "resume with the same data and data.seq_len"
            )
        self.position = int(state["position"])
        if "windows_consumed" in state:
            self.windows_consumed = int(state["windows_consumed"])
        else:  # written before windows_consumed was stored: position global micro-batches of this batch size
            self.windows_consumed = self.position * self.batch_size * int(state.get("world_size", self.world_size))


class StreamingDataset:
    def __init__(self, cfg: DataConfig, tokenizer, *, batch_size: int, rank: int, world_size: int, seed: int):
        from datasets.distributed import split_dataset_by_node

        ds = load_documents(cfg, streaming=True).shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
        self.stream = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.cfg, self.tokenizer, self.eos, self.seed = cfg, tokenizer, _eos_id(tokenizer), seed
        self.pad = _pad_id(tokenizer)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.position = 0
        self._windows = self._window_iter()
        self._served = 0  # windows this process has taken from the stream

    def _window_iter(self):
        """Endless (ids, mask) windows of L tokens."""
        L, epoch, buffer, n_docs = self.cfg.seq_len, 0, [], 0
        per_document = self.cfg.windows == "document"
        while True:
            self.stream.set_epoch(epoch)
            any_text = False
            for doc in self.stream:
                text = doc.get(self.cfg.text_field)
                if not isinstance(text, str) or not text.strip():
                    continue
                any_text = True
                ids = self.tokenizer(text, add_special_tokens=per_document)["input_ids"]
                if per_document:  # the window depends on the document's place in this process's stream
                    yield document_window(ids, L, self.pad, self.seed, n_docs)
                    n_docs += 1
                    continue
                buffer.extend(ids + [self.eos])
                while len(buffer) >= L:
                    yield buffer[:L], [1] * L
                    buffer = buffer[L:]
            if not any_text:
                raise ConfigError(f"data.path {self.cfg.path!r} streams no text in field {self.cfg.text_field!r} (empty dataset)")
            epoch += 1
            announce_epoch(epoch, "this process's share of the stream", self.cfg.max_documents)

    def next_batch(self) -> dict:
        target = self.position * self.batch_size
        while self._served < target:  # resuming: drop the windows already trained on
            next(self._windows)
            self._served += 1
        rows, masks = zip(*(next(self._windows) for _ in range(self.batch_size)))
        ids = [(self._served + i) * self.world_size + self.rank for i in range(self.batch_size)]
        self._served += self.batch_size
        self.position += 1
        input_ids = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.tensor(masks, dtype=torch.long), "sample_ids": ids}

    def state_dict(self) -> dict:
        return {"kind": "streaming", "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        written_by = int(state.get("world_size", self.world_size))
        if written_by != self.world_size:
            warnings.warn(
                f"streaming data resumed by {self.world_size} processes, written by {written_by}: the stream is split "
                f"per process, so each process skips {self.position} x {self.batch_size} windows of its own new share; "
                "some windows are trained again and others skipped (packed data resumes exactly)", UserWarning, stacklevel=2)


def announce_epoch(epoch: int, what: str, max_documents: int | None) -> None:
    """Epoch ``epoch`` (0-based) begins: an error under a document budget, else a warning (never a silent repeat)."""
    if max_documents is not None:
        raise ConfigError(f"{what} of data.max_documents {max_documents} documents have been trained on; the run stops "
                          "rather than repeat them: lower optim.steps or raise data.max_documents")
    warnings.warn(f"data: {what} have been trained on; epoch {epoch + 1} repeats them in a new order "
                  "(set data.max_documents to stop instead)", UserWarning, stacklevel=3)


def build_dataset(cfg: DataConfig, tokenizer, *, batch_size: int, rank: int, world_size: int, seed: int):
    # A streamed budget is read once and kept: its order and documents per step then do not depend on
    # the process count (split_dataset_by_node deals whole shards to processes when it can).
    cls = StreamingDataset if cfg.streaming and cfg.max_documents is None else PackedDataset
    return cls(cfg, tokenizer, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)


__all__ = ["PackedDataset", "StreamingDataset", "build_dataset", "pack_tokens", "load_documents"]
