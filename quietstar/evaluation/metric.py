"""The paper's teacher-forced metric (ALGORITHM.md, "Evaluation"; the reference's ``compute_metrics``).

For each question, the text ``prompt + answer`` is run through the model once (thoughts at every
position, one pass); for every answer token whose id is in the task's valid set (digits and newline
for GSM8K, the letters A-E and newline for CommonsenseQA) the model's probability of it is
renormalised over the valid set, and these are multiplied. Answer tokens outside the valid set are
skipped, as in the reference (for Mistral that is the lone "▁" before the first digit, which the
reference also skips explicitly). The score is the mean over questions.

Valid sets are built from the tokenizer: the single-token forms of "0".."9" (or "A".."E"), the token
that distinguishes " 0\\n" from " 1\\n" etc. when the space fuses with the symbol (GPT-2 style), and
"\\n". Tokenizers that merge several digits into one token (GPT-2) score only those answer tokens
that are single digits; the metric is meant for digit-splitting tokenizers (Mistral, Llama,
SmolLM2, Qwen), as in the paper.
"""

from __future__ import annotations

import contextlib

import torch

from .data import check_task, format_example

SYMBOLS = {"gsm8k": "0123456789", "commonsense_qa": "ABCDE"}


def renormalised_answer_probability(logits: torch.Tensor, ids: torch.Tensor, answer_start: int, valid_ids) -> float:
    """Product over answer tokens ``ids[answer_start:]`` in ``valid_ids`` of p(gold) / sum_valid p.

    ``logits`` ``[T, V]``: row t predicts ``ids[t + 1]``; ``ids`` ``[T]``.
    """
    valid = torch.as_tensor(list(valid_ids), device=logits.device)
    position = {int(v): j for j, v in enumerate(valid.tolist())}
    prob = 1.0
    for t in range(max(answer_start, 1), len(ids)):
        gold = int(ids[t])
        if gold not in position:
            continue
        renormalised = torch.softmax(logits[t - 1, valid].double(), dim=-1)  # softmax over the subset = renormalising
        prob *= float(renormalised[position[gold]])
    return prob


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def valid_token_ids(tokenizer, task: str) -> list[int]:
    """The ids a task's answer probabilities are renormalised over (see the module docstring)."""
    check_task(task)
    ids = set()
    forms = []
    for symbol in SYMBOLS[task]:
        single = _encode(tokenizer, symbol)
        if len(single) == 1:
            ids.add(single[0])
        forms.append(_encode(tokenizer, " " + symbol + "\n"))
    # the token at which " 0\n", " 1\n", ... differ, when it is the only differing one
    if len({len(f) for f in forms}) == 1:
        differ = [j for j in range(len(forms[0])) if len({f[j] for f in forms}) > 1]
        if len(differ) == 1:
            ids.update(f[differ[0]] for f in forms)
    newline = _encode(tokenizer, "\n")
    if len(newline) == 1:
        ids.add(newline[0])
    if len(ids) <= 1:
        raise ValueError(f"the tokenizer has no single-token forms of {SYMBOLS[task]!r}; the paper's metric cannot be computed")
    return sorted(ids)


@contextlib.contextmanager
def single_pass(model):
    """One thought per position while evaluating (the batch is repeated ``n_passes`` times otherwise)."""
    config = getattr(model, "config", None)
    passes = getattr(config, "n_passes", None)
    if passes is None or getattr(config, "model_type", None) != "quietstar":
        yield
        return
    config.n_passes = 1
    try:
        yield
    finally:
        config.n_passes = passes


@torch.no_grad()
def sequence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_thoughts: bool = True) -> torch.Tensor:
    """``[B, T, V]`` next-token logits: the mixed (thinking) prediction, the base one, or a plain LM's."""
    if not use_thoughts and hasattr(model, "base_lm"):  # the base model alone: no thoughts to sample
        return model.base_lm(input_ids, attention_mask=attention_mask).logits
    with single_pass(model):
        return model(input_ids, attention_mask=attention_mask).logits


def _tokenize_pair(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    prompt_ids, answer_ids = bos + _encode(tokenizer, prompt), _encode(tokenizer, answer)
    keep = max_length - len(answer_ids)
    if keep < 1:
        raise ValueError(f"max_length {max_length} leaves no room for the prompt (answer has {len(answer_ids)} tokens)")
    prompt_ids = prompt_ids[-keep:]  # long prompts are cut on the left: the answer must stay whole
    return prompt_ids + answer_ids, len(prompt_ids)


@torch.no_grad()
def paper_metric(
    model,
    tokenizer,
    examples: list[dict],
    task: str,
    *,
    batch_size: int = 8,
    use_thoughts: bool = True,
    max_length: int | None = None,
    progress: bool = False,
) -> dict:
    """Mean renormalised answer probability over ``examples`` (hub format) -> {"score", "n", "per_example"}.

    ``model``: a ``QuietStarForCausalLM`` (thoughts sampled at its ``thought_temperature``; with
    ``use_thoughts=False`` its base predictions) or any plain causal LM for a baseline.
    """
    valid = valid_token_ids(tokenizer, task)
    device = next(model.parameters()).device
    if max_length is None:
        config = getattr(model, "config", None)
        base_config = getattr(config, "base_config", config)
        limit = getattr(base_config, "max_position_embeddings", None) or 2048
        max_length = min(512, limit - (getattr(config, "n_extra_steps", 0) or 0))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    batches = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{task}", unit="batch")
    for start in batches:
        pairs = [_tokenize_pair(tokenizer, *format_example(task, row), max_length) for row in examples[start : start + batch_size]]
        T = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), T), dtype=torch.long)
        for b, (ids, _) in enumerate(pairs):  # right padding: earlier positions never see it
            input_ids[b, : len(ids)], mask[b, : len(ids)] = torch.tensor(ids), 1
        logits = sequence_logits(model, input_ids.to(device), mask.to(device), use_thoughts)
        for b, (ids, answer_start) in enumerate(pairs):
            scores.append(renormalised_answer_probability(logits[b, : len(ids)], torch.tensor(ids), answer_start, valid))
    return {"score": sum(scores) / max(len(scores), 1), "n": len(scores), "per_example": scores}
