"""The experiment's pieces on their own: the inference-cost count, the summary's arithmetic against a hand
computation, the other-style text (CHAMP) against the package's own file."""

import json
import statistics

import pytest
import torch

from quietstar.experiment.inference_cost import inference_cost
from quietstar.experiment.summary import summarise


@pytest.fixture(scope="module")
def tiny():
    from quietstar.loading import load_model

    torch.manual_seed(0)
    return load_model("tiny-random-llama", thought={"n_thought_tokens": 3, "n_talk_tokens": 2, "n_passes": 1})


@pytest.mark.parametrize("n", [1, 4])
def test_a_thinking_token_costs_n_plus_3_decoder_calls_and_a_plain_one_1(tiny, n):
    model, _ = tiny
    model.config.n_thought_tokens = n
    prompt = torch.randint(5, 200, (1, 11))
    thinking = inference_cost(model, prompt, new_tokens=4, repeats=1)
    plain = inference_cost(model.base_lm, prompt, new_tokens=4, repeats=1)
    assert thinking.forward_steps_per_token == n + 3 and plain.forward_steps_per_token == 1
    assert thinking.seconds_per_token > 0 and plain.seconds_per_token > 0 and thinking.prompt_tokens == 11
    assert model.training  # left as found


def test_inference_cost_refuses_a_batch_or_a_single_token(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="one prompt"):
        inference_cost(model.base_lm, torch.randint(5, 200, (2, 8)))
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        inference_cost(model.base_lm, torch.randint(5, 200, (1, 8)), new_tokens=1)


def _row(values, steps=1.0, metric=None):
    return {"per_token": {"generated": values}, "metric": metric,
            "cost": {"forward_steps_per_token": steps, "seconds_per_token": 0.01}}


def test_the_summary_equals_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    base = torch.rand(40, generator=g).mul(5).tolist()
    seed_rows = [[b - 0.1 * (i % 3) - s for i, b in enumerate(base)] for s in (0.0, 0.2)]
    results = {"base": {"rows": {"untouched base": _row(base)}},
               "runs": [{"arm": "x", "seed": s, "rows": {"model x": _row(v, 7.0, 0.1 * s)}} for s, v in enumerate(seed_rows)]}
    summary = summarise(results)["model x"]
    text = summary["texts"]["generated"]
    hardest = sorted(range(40), key=lambda i: base[i])[36:]  # the untouched base's 4 hardest tokens
    deltas = [statistics.fmean(v) - statistics.fmean(base) for v in seed_rows]
    hard_deltas = [statistics.fmean(v[i] - base[i] for i in hardest) for v in seed_rows]
    assert text["delta_nll"]["mean"] == pytest.approx(statistics.fmean(deltas))
    assert text["delta_nll"]["std"] == pytest.approx(statistics.pstdev(deltas))
    assert text["delta_hard_nll"]["mean"] == pytest.approx(statistics.fmean(hard_deltas))
    assert text["hard_nll"]["mean"] == pytest.approx(statistics.fmean(statistics.fmean(v[i] for i in hardest) for v in seed_rows))
    assert text["delta_deciles"][-1]["mean"] == pytest.approx(text["delta_hard_nll"]["mean"])
    assert summary["seeds"] == 2 and summary["forward_steps"]["mean"] == 7.0
    assert summary["metric"]["mean"] == pytest.approx(0.05)
    results["runs"][1]["rows"]["model x"]["per_token"]["generated"] = seed_rows[1][:-1]
    with pytest.raises(ValueError, match="same tokens"):
        summarise(results)


def test_champ_text_is_the_human_written_problems_and_solutions():
    champ_dataset = pytest.importorskip("champ_dataset")
    from importlib import resources

    from quietstar.experiment.other_style import champ_problems, champ_text, format_problem, other_style_text

    raw = json.loads((resources.files(champ_dataset) / "dataset_files" / "v0.json").read_text(encoding="utf-8"))["problems"]
    problems = champ_problems()
    assert len(problems) == len(raw) == 270
    text = champ_text()
    assert text.count("Problem: ") == 270 and text == other_style_text("champ")
    for ident in ("P_Combinatorics_1", sorted(raw)[-1]):
        p = raw[ident]
        steps = " ".join(s["_text"].strip() for s in p["solution"]["steps"])
        block = f"Problem: {p['_text'].strip()}\nSolution: {steps}\nAnswer: {p['_answer'].strip()}\n"
        assert block in text and block == format_problem(p["_text"], [s["_text"] for s in p["solution"]["steps"]], p["_answer"])
        for annotation in p.get("fws_annotations", {}).values():  # model-written solutions stay out
            assert annotation["text"].strip()[:200] not in text
    assert champ_text(limit=3).count("Problem: ") == 3
