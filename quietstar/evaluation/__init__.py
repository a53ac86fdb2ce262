"""Evaluation: the paper's teacher-forced metric and zero-shot chain of thought (``quietstar-eval``),
and lm-evaluation-harness glue.

See docs/ALGORITHM.md, "Evaluation", and ``metric.py``: the text ``"Q: {question}\\nA:" + " {answer}\\n"``
(with the tokenizer's own BOS) is scored with thoughts, as the product over answer tokens of the gold
token's probability renormalised over the digits (GSM8K) or the letters A-E (CommonsenseQA) plus the
newline token that ends the answer (itself scored), averaged over questions. ``zero_shot_cot.py``: the
official ``zero-shotcot-eval.py`` protocol (cot-maj@8 on GSM8K) with thinking generation.
"""

from .data import TASKS, format_example, load_examples, sample_path
from .metric import leading_special_ids, newline_token_id, paper_metric, renormalised_answer_probability, valid_token_ids
from .zero_shot_cot import CotProtocol, extract_answer, majority_vote, zero_shot_cot

__all__ = [
    "TASKS", "format_example", "load_examples", "sample_path", "leading_special_ids", "newline_token_id", "paper_metric",
    "renormalised_answer_probability", "valid_token_ids", "CotProtocol", "extract_answer", "majority_vote", "zero_shot_cot",
]
