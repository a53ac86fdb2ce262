"""Zero-shot chain of thought with majority vote (the official zero-shotcot-eval.py protocol):
answer extraction, votes and ties, stop markers, question order, sampling settings, and seeded
runs of thinking generation on a tiny model."""

import json

import numpy as np
import pytest
import torch

from char_tokenizer import char_tokenizer
from quietstar import QuietStarForCausalLM
from quietstar.evaluation import load_examples
from quietstar.evaluation.cli import run as eval_main
from quietstar.evaluation.zero_shot_cot import (
    CotProtocol, continue_texts, cut_at_stop_marker, extract_answer, extract_first_integer, gold_answer, majority_vote,
    question_order, reinit_delimiters_from_text, sample_votes, sampling_kwargs, select_questions, stop_token_ids,
    vote_on_texts, zero_shot_cot,
)
from tiny_models import tiny_base

TRIGGER = CotProtocol.answer_trigger
# No "?" in the questions: the char tokenizer's unknown token is "?", dropped when decoding without special tokens.
ROWS = [
    {"question": "Tom has 3 apples and gets 4 more. How many apples does he have", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes", "answer": "6 * 2 = 12\n#### 12"},
]


def tiny_thinking_model(seed=0):
    tok = char_tokenizer()
    base = tiny_base("llama", seed=seed, max_position_embeddings=512)  # prompts are ~100 characters
    model = QuietStarForCausalLM.from_base(base, tokenizer=tok, n_thought_tokens=2, n_talk_tokens=2, n_passes=1)
    return model.eval(), tok


def test_answer_extraction():
    assert extract_answer(f"Q: 2 apples{TRIGGER} 1,234 apples.") == 1234  # commas removed; the question's 2 is not read
    assert extract_answer(f"...{TRIGGER} $18.") == 18
    assert extract_answer(f"...{TRIGGER} -5") == 5  # no sign, as the script
    assert extract_answer(f"...{TRIGGER} 3.5") == 3  # no decimals, as the script
    assert extract_answer(f"...{TRIGGER} unknown") is None
    assert extract_answer(f"9{TRIGGER} 4 or so{TRIGGER} 7") == 7  # after the last trigger
    assert extract_answer("no trigger, 42 here") == 42
    assert extract_first_integer("twelve") is None
    assert gold_answer({"answer": "3 + 4 = 7 so\n#### 1,000"}) == 1000  # the reasoning's digits are not read


def test_majority_vote_ties_and_non_numbers():
    assert majority_vote([3, 5, 3]) == 3
    assert majority_vote([5, 3, 3, 5]) == 5  # tie: the answer sampled first wins
    assert majority_vote([3, 5, 5, 3]) == 3
    assert majority_vote([None, None, 4]) is None  # "no answer" is a vote
    assert majority_vote([None, 4, 4, None]) is None
    assert majority_vote([4, None]) == 4
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([])


def test_vote_on_hand_made_generations():
    texts = [f"Q: q{TRIGGER} {a}" for a in ("7", "12", "7 apples", "no idea")]
    verdict = vote_on_texts(texts, gold=7)
    assert verdict["votes"] == [7, 12, 7, None] and verdict["majority"] == 7 and verdict["correct"]
    assert not vote_on_texts(texts, gold=12)["correct"]
    unanswered = vote_on_texts([f"q{TRIGGER} none", f"q{TRIGGER} nothing"], gold=None)
    assert unanswered["majority"] is None and not unanswered["correct"]  # no answer is never right


class ScriptedModel(torch.nn.Module):
    """``generate`` appends hand-made continuations: the reasonings on its first call, the answers on its second."""

    def __init__(self, tok, reasonings, answers):
        super().__init__()
        self.tok, self.script, self.calls = tok, [reasonings, answers], []
        self.base_lm = None  # looks like a thinking model
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # for the device

    def generate(self, input_ids, attention_mask, **kwargs):
        replies = self.script[len(self.calls)]
        self.calls.append(kwargs)
        new = [self.tok(reply, add_special_tokens=False)["input_ids"][: kwargs["max_new_tokens"]] for reply in replies]
        width = max(map(len, new))
        pad = self.tok.pad_token_id
        tails = torch.tensor([ids + [pad] * (width - len(ids)) for ids in new])  # finished rows emit padding
        return torch.cat([input_ids, tails], dim=1)


def test_protocol_on_hand_made_generations():
    tok = char_tokenizer()
    reasonings = [" 3 + 4 = 7.  \n", " 3 + 4 = 8.\nQ: another question 99", " I do not know"]
    model = ScriptedModel(tok, reasonings, [" 7.", " 8 apples", " seven"])
    protocol = CotProtocol(n_votes=3)
    out = zero_shot_cot(model, tok, ROWS[:1], protocol)["per_question"][0]
    prompt = "Q: " + ROWS[0]["question"] + "\nA: Let's think step by step."
    assert out["texts"] == [  # right-stripped, cut at a second "Q:", then the trigger and the answer
        prompt + " 3 + 4 = 7." + TRIGGER + " 7.",
        prompt + " 3 + 4 = 8." + TRIGGER + " 8 apples",
        prompt + " I do not know" + TRIGGER + " seven",
    ]
    assert out["votes"] == [7, 8, None] and out["majority"] == 7 and out["gold"] == 7 and out["correct"]  # tie: first
    reasoning_call, answer_call = model.calls
    assert reasoning_call["max_new_tokens"] == 384 and answer_call["max_new_tokens"] == 12
    for call in model.calls:
        assert call["think"] is True and call["eos_token_id"] == stop_token_ids(tok)
        assert {k: call[k] for k in ("do_sample", "temperature", "top_k", "top_p")} == {
            "do_sample": True, "temperature": 0.9, "top_k": 0, "top_p": 1.0}


def test_stop_markers_cut_at_their_second_occurrence():
    prompt = "Q: how many\nA: Let's think step by step."
    assert cut_at_stop_marker(prompt + " 3 + 4 = 7.\nQ: next one") == (prompt + " 3 + 4 = 7.\n", True)
    assert cut_at_stop_marker(prompt + " 7\n\n\nmore") == (prompt + " 7\n\n\nmore", False)  # once is allowed
    assert cut_at_stop_marker(prompt + " a\n\n\nb\n\n\nc") == (prompt + " a\n\n\nb", True)
    # both markers twice: the one completed first stops the sample
    assert cut_at_stop_marker(prompt + " a\n\n\nb\n\n\nQ: c")[0] == prompt + " a\n\n\nb"
    assert cut_at_stop_marker(prompt + " a\n\n\nQ: b\n\n\nc")[0] == prompt + " a\n\n\n"
    assert cut_at_stop_marker(prompt) == (prompt, False)


def test_questions_as_the_script_takes_them():
    rows = load_examples("gsm8k")
    expected = [0, 7, 6, 9, 11, 3, 5, 2, 4, 10, 1, 8]  # numpy.random.default_rng(42).permutation(12)
    assert [rows.index(r) for r in question_order(rows, 42)] == expected
    assert question_order(rows, None) == rows
    protocol = CotProtocol()
    assert select_questions(rows, protocol, 3) == [rows[0], rows[7], rows[6]]
    numbered = [{"question": str(i), "answer": "#### 1"} for i in range(300)]
    assert len(select_questions(numbered, protocol)) == 128  # the script's max_idx
    datasets = pytest.importorskip("datasets")  # the script's own shuffle, where installed
    shuffled = datasets.Dataset.from_list(numbered).shuffle(seed=42)
    assert [r["question"] for r in question_order(numbered, 42)] == shuffled["question"]


def test_sampling_is_the_whole_softmax_at_the_protocol_temperature():
    assert sampling_kwargs(CotProtocol(temperature=0)) == {"do_sample": False}
    model, tok = tiny_thinking_model()
    ids = tok(["Q: 1 + 2\nA:"], return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=3, pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, **sampling_kwargs(CotProtocol()))
    for scores, logits in zip(out.scores, out.logits):
        # no top-k / top-p: every token keeps a finite score, logits / 0.9 (one fp32 division: ~1 ulp)
        assert torch.isfinite(scores).all()
        torch.testing.assert_close(scores, logits / 0.9, rtol=1e-6, atol=1e-6)
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, tok.pad_token_id})


def test_seeded_run_is_reproducible_and_respects_the_lengths():
    model, tok = tiny_thinking_model()
    protocol = CotProtocol(cot_tokens=6, answer_tokens=3, n_votes=3)
    first = zero_shot_cot(model, tok, ROWS, protocol, seed=0)
    again = zero_shot_cot(model, tok, ROWS, protocol, seed=0)  # same code path twice: bit-identical
    other = zero_shot_cot(model, tok, ROWS[:1], protocol, seed=1)
    assert first == again
    assert first["per_question"][0]["texts"] != other["per_question"][0]["texts"]
    assert first["n"] == 2 and first["accuracy"] == sum(q["correct"] for q in first["per_question"]) / 2
    for row, q in zip(ROWS, first["per_question"]):
        assert q["gold"] == gold_answer(row) and len(q["texts"]) == 3
        assert q["votes"] == [extract_answer(t) for t in q["texts"]] and q["majority"] == majority_vote(q["votes"])
        for text in q["texts"]:  # one character per token: the continuations' lengths are token counts
            prompt = protocol.prompt(row["question"])
            assert text.startswith(prompt) and text.count(TRIGGER) == 1
            reasoning, answer = text[len(prompt):].split(TRIGGER)
            assert len(reasoning) <= 6 and len(answer) <= 3
    # question i is seeded with seed + i, so its answers do not depend on the questions before it
    torch.manual_seed(0 + 1)
    assert sample_votes(model, tok, ROWS[1]["question"], protocol) == first["per_question"][1]["texts"]


def test_no_thoughts_is_the_base_lm_and_thinking_differs():
    model, tok = tiny_thinking_model()
    with torch.no_grad():
        for weight in model.mixing_head.parameters():
            weight.normal_(0, 1.0)  # |w| of order 1 or more: thoughts change the prediction
    protocol = CotProtocol(cot_tokens=8, answer_tokens=3, n_votes=2, temperature=0)
    model.config.thought_temperature = 0.0
    plain = zero_shot_cot(model, tok, ROWS[:1], protocol, think=False)["per_question"][0]["texts"]
    assert plain[0] == plain[1]  # greedy

    def base_greedy(text, new):  # the base LM alone, greedy, stopping on the same tokens
        ids = tok([text], return_tensors="pt")["input_ids"]
        out = model.base_lm.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=stop_token_ids(tok),
                                     pad_token_id=tok.pad_token_id)
        return tok.decode(out[0], skip_special_tokens=True)

    reasoning = base_greedy(protocol.prompt(ROWS[0]["question"]), 8)
    assert plain[0] == base_greedy(reasoning.rstrip() + TRIGGER, 3)
    thinking = zero_shot_cot(model, tok, ROWS[:1], protocol, think=True)["per_question"][0]["texts"]
    assert thinking[0] != plain[0]
    with pytest.raises(ValueError, match="cannot think"):
        zero_shot_cot(model.base_lm, tok, ROWS[:1], protocol, think=True)


def test_batched_continuations_of_different_lengths_match_one_by_one():
    model, tok = tiny_thinking_model()
    protocol = CotProtocol(temperature=0)
    texts = ["Q: 12 + 30 =", "Q: a much longer question, 7 * 6 ="]  # left padding for the first
    batched = continue_texts(model, tok, texts, 5, protocol, think=False)
    alone = [continue_texts(model, tok, [text], 5, protocol, think=False)[0] for text in texts]
    assert batched == alone and all(b.startswith(t) and len(b) > len(t) for b, t in zip(batched, texts))


def test_reinit_delimiters_from_dashes():
    model, tok = tiny_thinking_model()
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embedding.delimiter_embeddings.normal_()  # stand-in for trained delimiters
    reinit_delimiters_from_text(model, tok, "---")
    dash = embedding.weight[tok("---", add_special_tokens=False)["input_ids"][0]]
    # stored / embedding_scale and multiplied back: two fp32 roundings of the same vector
    torch.testing.assert_close(embedding.effective_delimiters(), dash.expand(2, -1), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="no thought delimiters"):
        reinit_delimiters_from_text(tiny_base("llama"), tok)


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_quietstar_eval_zero_shot_cot_with_a_baseline(tmp_path, capsys):
    from quietstar.loading import load_for_evaluation as load_model

    model, tok = tiny_thinking_model(seed=0)
    saved = _save(model, tok, tmp_path / "m")
    tiny_base("llama", seed=3, max_position_embeddings=512).save_pretrained(tmp_path / "plain")
    char_tokenizer().save_pretrained(tmp_path / "tok")  # apart: beside a llama config it would load as a Llama tokenizer
    baseline, baseline_tok = str(tmp_path / "plain"), str(tmp_path / "tok")
    settings = ["--limit", "2", "--votes", "2", "--cot-tokens", "5", "--answer-tokens", "2"]
    report = eval_main(["--mode", "zero-shot-cot", "--model", saved, "--baseline-model", baseline, "--baseline-tokenizer",
                        baseline_tok, *settings, "--output", str(tmp_path / "r.json")])
    assert report["columns"] == {
        "thinking": "this model, thinking (N=2)", "base": "this model's base LM, no thoughts",
        "baseline": f"baseline model {baseline}, no thoughts",
    }
    row, details = report["results"]["gsm8k"], report["details"]["gsm8k"]
    assert row["n"] == 2 and all(0 <= row[k] <= 1 for k in report["columns"])
    sample = load_examples("gsm8k")
    assert [q["question"] for q in details["thinking"]] == [sample[0]["question"], sample[7]["question"]]  # shuffled
    # each column is its model's own generation, with or without thoughts (same function, same seeds as here)
    protocol = CotProtocol(cot_tokens=5, answer_tokens=2, n_votes=2)
    columns = (("thinking", (saved, None), True), ("base", (saved, None), False), ("baseline", (baseline, baseline_tok), False))
    for key, (spec, tokenizer), think in columns:
        expected = zero_shot_cot(*load_model(spec, tokenizer=tokenizer), [sample[0], sample[7]], protocol, think=think, seed=0)
        assert [q["texts"] for q in details[key]] == [q["texts"] for q in expected["per_question"]], key
    assert [q["texts"] for q in details["baseline"]] != [q["texts"] for q in details["base"]]
    out = capsys.readouterr().out
    assert "| this model, thinking (N=2) | this model's base LM, no thoughts | baseline model" in out
    saved_report = json.loads((tmp_path / "r.json").read_text())
    assert saved_report["details"]["gsm8k"]["thinking"][0]["votes"] == details["thinking"][0]["votes"]
    with pytest.raises(SystemExit):
        eval_main(["--mode", "zero-shot-cot", "--model", saved, "--tasks", "commonsense_qa", *settings])
