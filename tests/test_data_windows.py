"""``data.windows: document`` and ``data.max_documents``: the reference's data (one random 256-token
window per document, shorter documents padded; the first documents of the set only)."""

import json

import pytest

from quietstar.assets import byte_tokenizer
from quietstar.training.config import ConfigError
from quietstar.training.config_checks import validate
from quietstar.training.config_loading import load_config
from quietstar.training.data import build_dataset
from test_training_config import TINY

L = 16


def _docs(tmp_path, n=12):
    # One byte = one token; document i is "<i>" then a letter run whose length varies around L.
    texts = [f"<{i}>" + chr(ord("a") + i % 26) * (4 + 5 * i % 23) for i in range(n)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def _windows(dataset, tok, n_batches):
    out = []
    for _ in range(n_batches):
        batch = dataset.next_batch()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n_real = int(mask.sum())
            assert mask[:n_real].all() and not mask[n_real:].any()  # padding only at the end
            out.append(tok.decode(ids[:n_real].tolist()))
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_one_window_per_document_from_the_first_documents(tmp_path, streaming):
    path, texts = _docs(tmp_path)
    cfg = load_config(TINY, [f"data.path={path}", f"data.seq_len={L}", "data.windows=document",
                             "data.max_documents=8", f"data.streaming={str(streaming).lower()}", "data.shuffle_buffer=8"])
    validate(cfg)
    tok = byte_tokenizer()
    dataset = build_dataset(cfg.data, tok, batch_size=2, rank=0, world_size=1, seed=0)
    windows = _windows(dataset, tok, 4)  # 8 windows: one epoch over the first 8 documents
    sources = []
    for window in windows:
        owners = [i for i, t in enumerate(texts) if window in t and (len(t) > L or window == t)]
        assert owners, f"window {window!r} is not a whole short document or a slice of a long one"
        sources.append(owners[0])
        assert len(window) == min(L, len(texts[owners[0]]))
    assert sorted(sources) == list(range(8))  # every one of the first 8 documents once, none after
    assert any(len(texts[i]) < L for i in sources) and any(len(texts[i]) > L for i in sources)
    # a random window of a long document, not always its beginning (truncate_or_pad's random start)
    assert any(not texts[i].startswith(w) for w, i in zip(windows, sources) if len(texts[i]) > L)
    if not streaming:
        assert len(dataset) == 8
    # deterministic: the same windows again (resuming reads the same random starts)
    again = build_dataset(cfg.data, tok, batch_size=2, rank=0, world_size=1, seed=0)
    assert _windows(again, tok, 4) == windows


def test_packed_windows_are_unchanged_by_default(tmp_path):
    path, texts = _docs(tmp_path)
    cfg = load_config(TINY, [f"data.path={path}", f"data.seq_len={L}"])
    dataset = build_dataset(cfg.data, byte_tokenizer(), batch_size=2, rank=0, world_size=1, seed=0)
    total = sum(len(t) + 1 for t in texts)  # each document + EOS, packed
    assert len(dataset) == -(-total // L) and dataset.n_tokens == total


def test_max_documents_is_validated():
    with pytest.raises(ConfigError, match="data.max_documents must be >= 1"):
        validate(load_config(TINY, ["data.max_documents=0"]))
    with pytest.raises(ConfigError, match="data.windows must be one of"):
        load_config(TINY, ["data.windows=sentence"])
