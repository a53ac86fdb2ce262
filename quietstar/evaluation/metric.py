"""The paper's teacher-forced metric (docs/ALGORITHM.md, "Evaluation"; the reference's ``compute_metrics``
in ``eval_helpers.py``).

For each question the text ``prompt + answer`` (``"Q: ...\\nA:" + " 72\\n"``) is encoded in one piece,
with the special tokens the tokenizer itself puts in front (BOS for Mistral/Llama, nothing for
GPT-2-style tokenizers), and run through the model once (thoughts at every position, one pass).
For every answer token whose id is in the task's valid set, the model's probability of it is
renormalised over the valid set, and these are multiplied; the score is the mean over questions.

The valid set is the reference's: the answer symbols (digits for GSM8K, the letters A-E for
CommonsenseQA) *as they are tokenised inside an answer*, plus the newline token that ends the
answer, which is therefore both a competitor at every answer position and scored itself (the
end-of-answer factor). For Mistral that is digits ``0``..``9`` + ``<0x0A>`` (GSM8K) and ``▁A``..``▁E``
+ ``<0x0A>`` (CommonsenseQA): the ids the reference hard-codes (``valid_number_tokens``, ending in 13,
and ``valid_letter_tokens`` 330, 365, 334, 384, 413, 13). Note that ``tokenizer("\\n")`` would give
``▁``, ``<0x0A>`` there: the newline is found in an encoded answer, never from ``"\\n"`` alone.
Answer tokens outside the valid set are skipped, as in the reference (for Mistral the lone ``▁``
before a number's first digit, which the reference skips explicitly).

Digit-merging tokenizers (GPT-2: ``" 72"`` is one token) give single-digit tokens only to some
numbers (``" 7"``, or ``"5"`` after ``" 100"``); the others' digits are skipped and only the newline
counts. The metric is meant for digit-splitting tokenizers (Mistral, Llama, SmolLM2, Qwen), as in
the paper.
"""

from __future__ import annotations

import contextlib

import torch

from .data import ANSWER_MARKER, check_task, format_example

SYMBOLS = {"gsm8k": "0123456789", "commonsense_qa": "ABCDE"}
# Answers are read where every question puts them: after the prompt's last "\nA:".
PROBE_PROMPT = "Q: ?" + ANSWER_MARKER


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


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of ``prompt + answer`` encoded in one piece, which is what the model reads.

    Encoding the answer alone differs for SentencePiece tokenizers (a ``▁`` is prepended to it).
    """
    whole = _encode(tokenizer, prompt + answer)
    n_prompt = _common_prefix_length(_encode(tokenizer, prompt), whole)
    return whole[:n_prompt], whole[n_prompt:]


def answer_token_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The ids ``answer`` gets after ``prompt`` (see :func:`encode_pair`)."""
    return encode_pair(tokenizer, prompt, answer)[1]


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text: ``[bos]`` for Mistral/Llama, ``[]`` for GPT-2.

    Read from an actual encoding, as the reference gets its BOS (``tokenizer.encode``), not from
    ``tokenizer.add_bos_token``: transformers v5 forgets that attribute on ``save_pretrained`` +
    reload while the tokenizer's post-processor still prepends ``<s>``.
    """
    plain, full = _encode(tokenizer, PROBE_PROMPT), tokenizer(PROBE_PROMPT)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    raise ValueError(
        f"the tokenizer's special tokens change the tokens of the text itself ({plain} -> {full}); "
        "the paper's metric needs a tokenizer that only adds tokens around the text"
    )


def _differing_symbol_ids(tokenizer, answers: list[list[int]], symbols: str) -> list[int] | None:
    """The ids at the one position where ``answers`` (one per symbol) differ, if each is exactly its symbol."""
    if len({len(a) for a in answers}) != 1:
        return None
    differ = [j for j in range(len(answers[0])) if len({a[j] for a in answers}) > 1]
    if len(differ) != 1:
        return None
    ids = [a[differ[0]] for a in answers]
    if any(tokenizer.decode([i]).strip() != s for i, s in zip(ids, symbols)):
        return None  # e.g. GPT-2's " 10": one token for two digits
    return ids


def _show(tokenizer, ids: list[int]) -> str:
    return str([tokenizer.convert_ids_to_tokens(i) for i in ids])


def newline_token_id(tokenizer, task: str = "gsm8k") -> int:
    """The id of the newline that ends an answer, found inside encoded answers.

    For SentencePiece tokenizers (Mistral, Llama-2) that is ``<0x0A>``; ``tokenizer("\\n")`` would give
    ``▁``, ``<0x0A>`` there.
    """
    check_task(task)
    answers = [answer_token_ids(tokenizer, PROBE_PROMPT, f" {s}\n") for s in SYMBOLS[task]]
    endings = {a[-1] for a in answers if a}
    newline = next(iter(endings)) if len(endings) == 1 else None
    if newline is None or tokenizer.decode([newline]) != "\n":
        raise ValueError(
            f"the tokenizer does not end the answers ' {SYMBOLS[task][0]}\\n' ... with one newline token "
            f"(' {SYMBOLS[task][0]}\\n' after {PROBE_PROMPT!r} -> {_show(tokenizer, answers[0])}); the paper's metric "
            "scores that token, so it needs a tokenizer that keeps '\\n' apart from the answer"
        )
    return newline


def valid_token_ids(tokenizer, task: str) -> list[int]:
    """The ids a task's answer probabilities are renormalised over: its symbols as they are tokenised
    inside answers, plus the newline token that ends an answer (see the module docstring)."""
    check_task(task)
    symbols = SYMBOLS[task]
    first = _differing_symbol_ids(tokenizer, [answer_token_ids(tokenizer, PROBE_PROMPT, f" {s}\n") for s in symbols], symbols)
    if first is None:
        example = answer_token_ids(tokenizer, PROBE_PROMPT, f" {symbols[0]}\n")
        raise ValueError(
            f"the tokenizer has no single-token form of each of {symbols!r} in an answer (' {symbols[0]}\\n' after "
            f"{PROBE_PROMPT!r} -> {_show(tokenizer, example)}); the paper's metric scores each as one token, "
            "so it cannot be computed with this tokenizer"
        )
    ids = set(first) | {newline_token_id(tokenizer, task)}
    if task == "gsm8k":  # digits also stand inside numbers: "▁", "7", "2" (Mistral); "Ġ100", "5" (GPT-2)
        inner = _differing_symbol_ids(tokenizer, [answer_token_ids(tokenizer, PROBE_PROMPT, f" 1{d}\n") for d in symbols], symbols)
        ids.update(inner or ())
        for digit in symbols:
            alone = _encode(tokenizer, digit)
            if len(alone) == 1 and tokenizer.decode(alone) == digit:
                ids.add(alone[0])
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


def _tokenize_pair(tokenizer, prompt: str, answer: str, max_length: int, leading: list[int]) -> tuple[list[int], int]:
    """(``leading + ids of prompt + answer``, index of the first answer token); long prompts are cut
    on the left, after the leading special tokens, so that BOS and the whole answer stay."""
    prompt_ids, answer_ids = encode_pair(tokenizer, prompt, answer)
    keep = max_length - len(leading) - len(answer_ids)
    if keep < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for the prompt (answer {len(answer_ids)} tokens, "
            f"{len(leading)} leading special); raise max_length"
        )
    prompt_ids = prompt_ids[-keep:]
    return leading + prompt_ids + answer_ids, len(leading) + len(prompt_ids)


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
    valid, leading = valid_token_ids(tokenizer, task), leading_special_ids(tokenizer)
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
        pairs = [_tokenize_pair(tokenizer, *format_example(task, row), max_length, leading) for row in examples[start : start + batch_size]]
        T = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), T), dtype=torch.long)
        for b, (ids, _) in enumerate(pairs):  # right padding: earlier positions never see it
            input_ids[b, : len(ids)], mask[b, : len(ids)] = torch.tensor(ids), 1
        logits = sequence_logits(model, input_ids.to(device), mask.to(device), use_thoughts)
        for b, (ids, answer_start) in enumerate(pairs):
            scores.append(renormalised_answer_probability(logits[b, : len(ids)], torch.tensor(ids), answer_start, valid))
    return {"score": sum(scores) / max(len(scores), 1), "n": len(scores), "per_example": scores}
