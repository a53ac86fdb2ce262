"""Evaluation: the paper's teacher-forced metric (``quietstar-eval``) and lm-evaluation-harness glue.

See ALGORITHM.md, "Evaluation": the prompt ``"Q: {question}\\nA:" + " {answer}\\n"`` is scored with
thoughts, as the product over answer tokens of the gold token's probability renormalised over the
digit tokens (GSM8K) or the letters A-E (CommonsenseQA), averaged over questions.
"""

from .data import TASKS, format_example, load_examples, sample_path
from .metric import paper_metric, renormalised_answer_probability, valid_token_ids

__all__ = ["TASKS", "format_example", "load_examples", "sample_path", "paper_metric", "renormalised_answer_probability", "valid_token_ids"]
