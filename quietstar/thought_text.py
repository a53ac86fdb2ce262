"""A thought rendered in its text, for the console, logs, the demo and the inspection report."""

from __future__ import annotations


def thought_in_context(tokenizer, input_ids, thought_ids, row: int, pos: int, before: int = 12, after: int = 3) -> str:
    """One thought in its text: ``...context <|startthought|>thought<|endthought|> -> next tokens``.

    ``input_ids`` ``[B, L]`` and ``thought_ids`` ``[B, L, N]`` rows aligned (repeat inputs per pass)."""
    context = tokenizer.decode(input_ids[row, max(0, pos - before) : pos + 1].tolist())
    thought = tokenizer.decode(thought_ids[row, pos].tolist())
    upcoming = tokenizer.decode(input_ids[row, pos + 1 : pos + 1 + after].tolist())
    return f"...{context!r} <|startthought|>{thought!r}<|endthought|> -> {upcoming!r}"


def sample_thoughts_text(tokenizer, batch_ids, thought_ids, n: int, n_passes: int) -> list[str]:
    """``n`` thoughts of one batch in their text, at evenly spaced positions (first pass of each row)."""
    L, rows = batch_ids.shape[1], batch_ids.repeat_interleave(n_passes, 0)
    return [thought_in_context(tokenizer, rows, thought_ids, (j % batch_ids.shape[0]) * n_passes, (L * (j + 1)) // (n + 1))
            for j in range(n)]
