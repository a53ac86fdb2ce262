"""The paper's other GSM8K evaluation: zero-shot chain of thought, majority vote over 8 samples
(cot-maj@8; the official ``zero-shotcot-eval.py``), with thinking generation (``model.generate``).

Protocol, per question (:class:`CotProtocol` holds every number):

1. Questions: the GSM8K test split shuffled as the script shuffles it (``datasets``' ``shuffle(seed=42)``,
   i.e. ``numpy.random.default_rng(42).permutation``), the first 128 of them.
2. Prompt ``"Q: " + question + "\\nA: Let's think step by step."``, encoded with the tokenizer's own
   special tokens (BOS for Mistral). 8 samples ("votes") of up to 384 new tokens, sampled at
   temperature 0.9 from the whole distribution (no top-k, no top-p; 0 = greedy); the delimiters are
   never emitted. A sample ends at EOS, BOS or the padding token, or as soon as the text (prompt +
   sample) holds ``"Q:"`` or ``"\\n\\n\\n"`` twice; the text is then cut before that second occurrence.
3. The text, right-stripped, gets ``"\\nTherefore, the answer (arabic numerals) is"``, is encoded
   afresh and continued for up to 12 tokens the same way (same stops).
4. Answer: the first run of digits after the last ``"...(arabic numerals) is"``, commas removed, as an
   integer (signs and decimals are not read: "-5" -> 5, "3.5" -> 3); the gold answer is read the
   same way from the text after ``"#### "``. A text without digits votes "no answer" (None).
5. Majority vote over the 8 answers: the most frequent one; a tie goes to the answer sampled first
   among the tied ones (``collections.Counter.most_common``, as the script). "No answer" is a vote
   like any other and can win; the question then counts as wrong. Accuracy = mean over questions.

Where the official script is odd, this module follows the paper and offers the script's behaviour:

- The script's model re-initialises the thought delimiters from the embedding of "---" on its first
  forward (``start_token_id`` is unset after loading), so the released checkpoint is evaluated
  with untrained delimiters. Here the model is evaluated as trained;
  :func:`reinit_delimiters_from_text` (``quietstar-eval --reinit-delimiters``) does what the script does.
- Its loop bounds give up to 385 sample tokens and 11 answer tokens when the sample reaches its
  cap (up to 13 answer tokens when it ends early); here 384 and 12, its stated parameters
  (``--cot-tokens 385 --answer-tokens 11`` gives the capped case).
- When it cuts at a stop marker it re-encodes a list of pieces (a text pair), which drops the
  prompt's own "Q:"; here the prompt stays intact and only the sample is cut.
- Its ``--baseline`` flag scores the same trained checkpoint without thoughts (the "this model's base
  LM" column of ``quietstar-eval``); the untouched Mistral-7B is a separate ``--baseline-model``.

Votes are sampled as one batch of 8 rows, not one after another, so the random stream differs from
the script's (same distribution); each question is seeded with ``seed + its index``, so a question's
answers do not depend on ``--limit`` or on the questions before it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class CotProtocol:
    """The official script's settings (its argparse defaults); every one can be changed."""

    prompt_suffix: str = "\nA: Let's think step by step."
    answer_trigger: str = "\nTherefore, the answer (arabic numerals) is"
    cot_tokens: int = 384  # the sample's cap (the script's start_final_answer_idx)
    answer_tokens: int = 12  # the answer's cap (answer_length)
    temperature: float = 0.9  # emitted tokens; 0 = greedy. Thoughts use the model's thought_temperature
    top_k: int = 0  # 0 = no top-k (the script samples the whole softmax)
    top_p: float = 1.0  # 1 = no nucleus truncation
    n_votes: int = 8
    n_questions: int = 128  # the script's max_idx
    shuffle_seed: int | None = 42  # None: the file's order
    stop_markers: tuple[str, ...] = ("Q:", "\n\n\n")

    def __post_init__(self):
        for name in ("cot_tokens", "answer_tokens", "n_votes", "n_questions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature >= 0, top_k >= 0 (0 = off), 0 < top_p <= 1; got {self.temperature}, {self.top_k}, {self.top_p}"
            )

    def prompt(self, question: str) -> str:
        return "Q: " + question + self.prompt_suffix


# ----------------------------------------------------------------------------- answers and votes


def extract_first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` with commas removed, or None (the script's extraction)."""
    match = re.search(r"\d+", text.replace(",", ""))
    return int(match.group()) if match else None


def extract_answer(text: str, trigger: str = CotProtocol.answer_trigger) -> int | None:
    """The integer after the last ``trigger`` in a generated text (the whole text if it lacks one)."""
    return extract_first_integer(text.split(trigger)[-1])


def gold_answer(row: dict) -> int | None:
    """A GSM8K row's answer, read as the votes are: the first integer after ``"#### "``."""
    return extract_first_integer(row["answer"].split("#### ")[-1])


def majority_vote(answers: list) -> int | None:
    """The most frequent answer; ties go to the one sampled first; None ("no answer") is a vote too."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    return Counter(answers).most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def vote_on_texts(texts: list[str], gold: int | None, trigger: str = CotProtocol.answer_trigger) -> dict:
    """One question's verdict from its generated texts: {"votes", "majority", "gold", "correct"}."""
    votes = [extract_answer(text, trigger) for text in texts]
    majority = majority_vote(votes)
    return {"votes": votes, "majority": majority, "gold": gold, "correct": majority is not None and majority == gold}


# ----------------------------------------------------------------------------- stopping


def _second_occurrence(text: str, marker: str) -> tuple[int, int] | None:
    """(start, end) of the second non-overlapping ``marker`` in ``text`` (as ``str.count`` counts)."""
    first = text.find(marker)
    if first < 0:
        return None
    second = text.find(marker, first + len(marker))
    return None if second < 0 else (second, second + len(marker))


def cut_at_stop_marker(text: str, markers=CotProtocol.stop_markers) -> tuple[str, bool]:
    """(``text`` cut before the first point where a marker has occurred twice, whether it was cut).

    Checked token by token, the marker whose second occurrence is completed first stops the sample.
    """
    found = [hit for hit in (_second_occurrence(text, m) for m in markers) if hit is not None]
    if not found:
        return text, False
    start, _ = min(found, key=lambda hit: hit[1])
    return text[:start], True


class StopMarkerCriteria(StoppingCriteria):
    """Stops a row once its decoded text holds a stop marker twice (the script's per-token check)."""

    def __init__(self, tokenizer, markers):
        self.tokenizer, self.markers = tokenizer, tuple(markers)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = [cut_at_stop_marker(text, self.markers)[1] for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS, BOS and padding: the tokens that end a sample in the script."""
    ids = (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    return sorted({int(i) for i in ids if i is not None})


# ----------------------------------------------------------------------------- generation


def sampling_kwargs(protocol: CotProtocol) -> dict:
    """``generate`` keywords for the emitted tokens: the whole softmax at ``temperature``, or greedy."""
    if protocol.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": protocol.temperature, "top_k": protocol.top_k, "top_p": protocol.top_p}


@torch.no_grad()
def continue_texts(model, tokenizer, texts: list[str], max_new_tokens: int, protocol: CotProtocol, think: bool) -> list[str]:
    """Each text continued by thinking generation (``think=False``: the base LM), decoded without
    special tokens and cut at a stop marker: the prompt text plus its continuation."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    if not hasattr(model, "base_lm") and think:
        raise ValueError(f"{type(model).__name__} cannot think; pass think=False or wrap it with QuietStarForCausalLM.from_base")
    thinking = {"think": think} if hasattr(model, "base_lm") else {}  # a plain causal LM generates as itself
    out = model.generate(
        batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([StopMarkerCriteria(tokenizer, protocol.stop_markers)]),
        **thinking,
        **sampling_kwargs(protocol),
    )
    decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [cut_at_stop_marker(text, protocol.stop_markers)[0] for text in decoded]


def sample_votes(model, tokenizer, question: str, protocol: CotProtocol, think: bool = True) -> list[str]:
    """The ``n_votes`` full texts of one question: prompt, chain of thought, trigger, answer."""
    prompt = protocol.prompt(question)
    reasoning = continue_texts(model, tokenizer, [prompt] * protocol.n_votes, protocol.cot_tokens, protocol, think)
    with_trigger = [text.rstrip() + protocol.answer_trigger for text in reasoning]
    return continue_texts(model, tokenizer, with_trigger, protocol.answer_tokens, protocol, think)


# ----------------------------------------------------------------------------- the evaluation


def question_order(rows: list[dict], shuffle_seed: int | None) -> list[dict]:
    """The rows as the script takes them: ``datasets``' ``shuffle(seed)`` (a numpy permutation)."""
    if shuffle_seed is None:
        return list(rows)
    return [rows[i] for i in np.random.default_rng(shuffle_seed).permutation(len(rows))]


def select_questions(rows: list[dict], protocol: CotProtocol, limit: int | None = None) -> list[dict]:
    """The shuffled test split's first ``limit`` questions (default: the protocol's 128)."""
    return question_order(rows, protocol.shuffle_seed)[: limit or protocol.n_questions]


def zero_shot_cot(
    model, tokenizer, rows: list[dict], protocol: CotProtocol = CotProtocol(), *, think: bool = True, seed: int = 0,
    progress: bool = False,
) -> dict:
    """cot-maj@k over ``rows`` (GSM8K hub format, already selected) -> {"accuracy", "n", "per_question"}.

    ``think=False`` generates with the base LM alone (no thoughts). Question i is seeded with
    ``seed + i`` (torch's global generator: emitted tokens and thoughts).
    """
    if not rows:
        raise ValueError("no questions to evaluate; check --limit and the data source")
    indices = range(len(rows))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="zero-shot CoT", unit="question")
    per_question = []
    for i in indices:
        torch.manual_seed(seed + i)
        texts = sample_votes(model, tokenizer, rows[i]["question"], protocol, think=think)
        verdict = vote_on_texts(texts, gold_answer(rows[i]), protocol.answer_trigger)
        per_question.append({"index": i, "question": rows[i]["question"], **verdict, "texts": texts})
    accuracy = sum(q["correct"] for q in per_question) / len(per_question)
    return {"accuracy": accuracy, "n": len(per_question), "per_question": per_question}


def reinit_delimiters_from_text(model, tokenizer, text: str = "---") -> None:
    """Set both delimiter vectors to the embedding of ``text``'s first token, as the official model
    does on its first forward after loading (module docstring); the paper's protocol skips this."""
    embedding = model.get_input_embeddings()
    if not hasattr(embedding, "init_delimiters"):
        raise TypeError(f"{type(model).__name__} has no thought delimiters to re-initialise; pass a QuietStarForCausalLM")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} encodes to no tokens; pick a text the tokenizer can encode")
    with torch.no_grad():
        embedding.init_delimiters(embedding.weight[ids[0]].detach().clone())
