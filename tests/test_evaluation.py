"""The paper's teacher-forced metric, the data formats, quietstar-eval, and the lm-eval wrapper."""

import math

import pytest
import torch

from char_tokenizer import char_tokenizer
from quietstar import QuietStarForCausalLM
from quietstar.evaluation import format_example, load_examples, paper_metric, renormalised_answer_probability, valid_token_ids
from quietstar.evaluation.cli import run as eval_main
from quietstar.evaluation.metric import leading_special_ids, newline_token_id
from tiny_models import tiny_base


def test_renormalised_probability_by_hand():
    # vocabulary of 6; valid set {1, 2, 5}; sequence [0, 3, 1, 4, 5]: answer starts at index 1.
    # Position 1 (token 3) is not valid: skipped. Position 2 (token 1) from row 1, position 4 (token 5) from row 3.
    logits = torch.full((5, 6), -1e9, dtype=torch.float64)
    logits[1, [1, 2, 5]] = torch.log(torch.tensor([0.2, 0.2, 0.1], dtype=torch.float64))  # renormalised: 0.4, 0.4, 0.2
    logits[1, 0] = 5.0  # a large invalid logit changes nothing
    logits[3, [1, 2, 5]] = torch.log(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))  # renormalised p(5) = 0.5
    ids = torch.tensor([0, 3, 1, 4, 5])
    assert renormalised_answer_probability(logits, ids, 1, [1, 2, 5]) == pytest.approx(0.4 * 0.5, abs=1e-12)
    assert renormalised_answer_probability(logits, ids, 3, [1, 2, 5]) == pytest.approx(0.5, abs=1e-12)


def test_samples_load_and_format():
    gsm, csqa = load_examples("gsm8k"), load_examples("commonsense_qa")
    assert len(gsm) >= 10 and len(csqa) >= 10
    assert format_example("gsm8k", gsm[0]) == ("Q: " + gsm[0]["question"] + "\nA:", " 15\n")
    prompt, answer = format_example("commonsense_qa", csqa[1])
    assert prompt.endswith("\n(E) swim\nA:") and answer == " B\n"
    # the text after "####", commas kept as the reference keeps them (a comma is never scored, but it is read)
    assert format_example("gsm8k", {"question": "q", "answer": "so\n#### 1,000"}) == ("Q: q\nA:", " 1,000\n")
    with pytest.raises(ValueError, match="unknown task"):
        load_examples("mmlu")


def test_paper_metric_end_to_end_equals_manual_computation():
    tok = char_tokenizer()
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), n_thought_tokens=2, n_talk_tokens=2, n_passes=2).eval()
    examples = load_examples("gsm8k", limit=3)
    digits = valid_token_ids(tok, "gsm8k")
    assert len(digits) == 11  # 0-9 and newline
    # the mixing head starts at w = 0: thinking and base scores both equal the base model's renormalised probabilities
    expected = []
    for row in examples:
        prompt, answer = format_example("gsm8k", row)
        ids = torch.tensor(tok(prompt + answer, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            probs = torch.softmax(model.base_lm(ids[None]).logits[0].double(), -1)
        p = 1.0
        for t in range(len(tok(prompt)["input_ids"]), len(ids)):  # " ", digits, "\n": the space is not valid
            if int(ids[t]) in digits:
                p *= float(probs[t - 1, ids[t]] / probs[t - 1, digits].sum())
        expected.append(p)
    for use_thoughts in (True, False):
        got = paper_metric(model, tok, examples, "gsm8k", batch_size=2, use_thoughts=use_thoughts)
        assert got["n"] == 3
        assert got["per_example"] == pytest.approx(expected, rel=1e-4)
        assert got["score"] == pytest.approx(sum(expected) / 3, rel=1e-4)
    # a non-zero head changes the thinking score but not the base score
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 1.0)
    torch.manual_seed(0)
    thinking = paper_metric(model, tok, examples, "gsm8k", batch_size=3)["score"]
    assert thinking != pytest.approx(sum(expected) / 3, rel=1e-4)
    assert 0.0 < thinking < 1.0 and math.isfinite(thinking)


def test_quietstar_eval_cli_on_a_saved_model(tmp_path, capsys):
    from quietstar.loading import load_for_evaluation as load_model

    tok = char_tokenizer()
    model = QuietStarForCausalLM.from_base(tiny_base("qwen2"), tokenizer=tok, n_thought_tokens=2, n_talk_tokens=2, n_passes=1)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tiny_base("qwen2", seed=5).save_pretrained(tmp_path / "plain")  # the reference model: other weights
    char_tokenizer().save_pretrained(tmp_path / "tok")  # apart: beside a qwen2 config it would load as Qwen2Tokenizer
    baseline, baseline_tok = str(tmp_path / "plain"), str(tmp_path / "tok")
    report = eval_main(["--model", str(tmp_path / "m"), "--limit", "4", "--batch-size", "4", "--baseline-model", baseline,
                        "--baseline-tokenizer", baseline_tok, "--output", str(tmp_path / "r.json")])
    assert report["mode"] == "metric" and set(report["results"]) == {"gsm8k", "commonsense_qa"}
    assert report["columns"] == {"thinking": "this model, thinking (N=2)", "base": "this model's base LM, no thoughts",
                                 "baseline": f"baseline model {baseline}, no thoughts"}
    reference, reference_tok = load_model(baseline, tokenizer=baseline_tok)
    for task, row in report["results"].items():
        assert row["n"] == 4 and 0 < row["thinking"] <= 1 and row["thinking"] == pytest.approx(row["base"], rel=1e-4)  # w = 0
        # the baseline column scores the baseline model (same function, same inputs as here)
        expected = paper_metric(reference, reference_tok, load_examples(task, limit=4), task, use_thoughts=False)["score"]
        assert row["baseline"] == pytest.approx(expected, rel=1e-9)
        assert row["baseline"] != pytest.approx(row["base"], rel=1e-3)
    out = capsys.readouterr().out
    assert "| task | n | this model, thinking (N=2) | this model's base LM, no thoughts | baseline model " in out
    assert "not the untouched model" in out and (tmp_path / "r.json").exists()
    only_thinking = eval_main(["--model", str(tmp_path / "m"), "--tasks", "gsm8k", "--limit", "2", "--no-base"])
    assert list(only_thinking["columns"]) == ["thinking"] and set(only_thinking["results"]["gsm8k"]) == {"n", "thinking"}


def test_valid_ids_of_byte_level_tokenizers():
    """GPT-2 style: the space fuses with the letter/digit, "\\n" is its own token, no BOS is added."""
    from quietstar.assets import gpt2_tokenizer

    tok = gpt2_tokenizer()
    ids = lambda tokens: sorted(tok.convert_tokens_to_ids(tokens))  # noqa: E731
    assert newline_token_id(tok) == tok.convert_tokens_to_ids("\u010a") == 198
    assert valid_token_ids(tok, "commonsense_qa") == ids(["\u0120" + x for x in "ABCDE"] + ["\u010a"])
    # " 7" is one token; bare digits stand inside numbers (" 1005" -> " 100", "5"); " 10" is never one digit
    assert valid_token_ids(tok, "gsm8k") == ids(["\u0120" + d for d in "0123456789"] + list("0123456789") + ["\u010a"])
    assert leading_special_ids(tok) == [] and leading_special_ids(char_tokenizer()) == []
