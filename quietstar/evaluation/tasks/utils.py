"""Helpers of the quietstar lm-eval tasks: the reference's CommonsenseQA prompt and the paper's score.

The paper's score (``eval_helpers.compute_metrics`` in the official code, and ``paper_metric``
here) multiplies two renormalised probabilities over the six answer tokens ``▁A``..``▁E`` and the
newline: the gold letter's after ``"\\nA:"``, and the newline's after the gold letter. lm-eval gives
the log-likelihood of a string continuation, so each doc asks for twelve:

- ``" A"`` .. ``" E"``, ``"\\n"``             -> log p(x | prompt) for the six tokens at the letter's position
- ``g + " A"`` .. ``g + " E"``, ``g + "\\n"``  -> log p(g | prompt) + log p(x | prompt, g), with ``g`` = " " + gold

Within each group the shared terms cancel in the softmax, which gives the two renormalised factors.
This is exact when each continuation is the tokens named above, i.e. when the letter fuses with its
space into one token and the newline is its own token after ``":"`` and after a letter: Mistral,
Llama, GPT-2 and SmolLM2 tokenizers do; Qwen's merges ":" with a following newline, so use
quietstar-eval there. lm-eval reuses one forward for continuations that share a context and differ
in the last token only (``logits_cache``, on by default), so the six alternatives of a factor see the
same sampled thought, as in the reference's single forward.
"""

import math

from quietstar.evaluation.data import format_example, load_examples

LETTERS = ["A", "B", "C", "D", "E"]
ANSWER_TOKENS = [" " + letter for letter in LETTERS] + ["\n"]


def doc_to_text(doc):
    return format_example("commonsense_qa", doc)[0]  # the prompt quietstar-eval scores


def doc_to_target(doc):
    return LETTERS.index(doc["answerKey"].strip())


def doc_to_choice(doc):
    gold = ANSWER_TOKENS[doc_to_target(doc)]
    return ANSWER_TOKENS + [gold + token for token in ANSWER_TOKENS]


def _renormalised(log_likelihoods, index):
    top = max(log_likelihoods)
    probs = [math.exp(ll - top) for ll in log_likelihoods]
    return probs[index] / sum(probs)


def process_results(doc, results):
    lls = [ll for ll, _ in results]
    if len(lls) != 2 * len(ANSWER_TOKENS):
        raise ValueError(f"expected {2 * len(ANSWER_TOKENS)} log-likelihoods per doc (see doc_to_choice), got {len(lls)}")
    gold = doc_to_target(doc)
    letter, newline = lls[: len(ANSWER_TOKENS)], lls[len(ANSWER_TOKENS) :]
    score = _renormalised(letter, gold) * _renormalised(newline, len(ANSWER_TOKENS) - 1)
    best = max(range(len(LETTERS)), key=lambda i: letter[i])
    return {"paper_score": score, "acc": float(best == gold)}


def sample_dataset(**kwargs):
    import datasets

    return {"validation": datasets.Dataset.from_list(load_examples("commonsense_qa", "sample"))}
