"""quietstar-convert: a tiny random checkpoint written by hand in the official code's layout
(ezelikman/quiet-star ``modeling_mistral.py`` saved by transformers 4.37, see official_layout.py)
converts exactly, with the thought lengths given and the delimiter ids its tokenizer gives by name,
runs, and anything else is refused with the offending key and the fix."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quietstar  # noqa: F401  (registers the quietstar model type)
from official_layout import (
    EVAL_MAX_THOUGHTS, OFFICIAL_ORDER, V, official_config, official_state_dict, word_tokenizer, write_checkpoint,
)
from quietstar.convert import ConversionError, convert_official_checkpoint, main

N_AHEAD, N_AHEAD_TALK = 6, 3  # explicit here; config.json never records them
NO_TOKENIZER_IDS = {"start_thought_token_id": V - 2, "end_thought_token_id": V - 1}  # as the official scripts add them


def assert_exact_copy(model, state):
    ours = model.state_dict()
    for key, tensor in state.items():
        if key.startswith("talk_head.0."):
            assert torch.equal(ours["mixing_head.mlp." + key.removeprefix("talk_head.0.")], tensor), key
        elif key not in ("start_embedding", "end_embedding"):
            assert torch.equal(ours["base_lm." + key], tensor), key
    delimiters = ours["base_lm.model.embed_tokens.delimiter_embeddings"]
    assert torch.equal(delimiters[0], state["start_embedding"][0]) and torch.equal(delimiters[1], state["end_embedding"][0])


@pytest.mark.parametrize("shards", [1, 2])
def test_conversion_copies_every_tensor_exactly(tmp_path, shards):
    state = official_state_dict()
    src = write_checkpoint(tmp_path / "official", state, shards=shards)
    model = convert_official_checkpoint(src, n_ahead=N_AHEAD, n_ahead_talk=N_AHEAD_TALK, **NO_TOKENIZER_IDS)
    assert_exact_copy(model, state)
    cfg = model.config
    assert (cfg.n_thought_tokens, cfg.n_talk_tokens) == (N_AHEAD - 3, N_AHEAD_TALK)
    assert (cfg.start_thought_token_id, cfg.end_thought_token_id) == (V - 2, V - 1)
    assert cfg.embedding_scale == 100.0 and cfg.mixing_head_activation == "none"
    # the vectors the model feeds are the official ones: stored / 100, multiplied back
    torch.testing.assert_close(model.delimiter_embedding.effective_delimiters()[0], state["start_embedding"][0] * 100)


def test_converted_model_runs_and_round_trips_through_save_pretrained(tmp_path):
    state = official_state_dict()
    src = write_checkpoint(tmp_path / "official", state)
    model = convert_official_checkpoint(src, n_ahead=N_AHEAD, n_ahead_talk=N_AHEAD_TALK, n_passes=1, **NO_TOKENIZER_IDS)
    ids = torch.randint(3, V - 2, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss) and out.thought_ids.shape == (2, 10, N_AHEAD - 3)
    assert out.mixing_weights.abs().sum() > 0  # the trained head is used, not re-initialised
    assert not ((out.thought_ids == V - 2) | (out.thought_ids == V - 1)).any()  # delimiters are never sampled
    # the delimiter ids inside the table read the checkpoint's vectors, not the table's rows
    torch.testing.assert_close(model.get_input_embeddings()(torch.tensor([V - 1])), state["end_embedding"][:1] * 100)

    with pytest.warns(UserWarning, match="no tokenizer: assuming"):
        assert main([str(src), str(tmp_path / "converted"), "--n-ahead", str(N_AHEAD), "--n-ahead-talk", str(N_AHEAD_TALK)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert_exact_copy(reloaded, state)
    assert not list(tmp_path.glob(".converted.*"))  # the staging folder is gone


def test_dtype_embedding_scale_and_a_max_thoughts_too_small_for_n_ahead():
    state = official_state_dict(dtype=torch.bfloat16)
    # max_thoughts 10 = n_ahead + n_ahead_talk + 1 with n_ahead_talk >= 1 allows n_ahead <= 8, not 9
    with pytest.warns(UserWarning, match="max_thoughts = 10 says the checkpoint was loaded with n_ahead <= 8"):
        convert_official_checkpoint(state, config=official_config(), n_ahead=9, **NO_TOKENIZER_IDS)
    model = convert_official_checkpoint(state, config=official_config(), n_ahead=8, embedding_scale=10.0, **NO_TOKENIZER_IDS)
    assert model.base_lm.lm_head.weight.dtype == torch.bfloat16
    assert (model.config.n_thought_tokens, model.config.n_talk_tokens) == (5, 4)  # the released model's N, K
    torch.testing.assert_close(model.delimiter_embedding.effective_delimiters()[1].float(),
                               state["end_embedding"][0].float() * 100, rtol=1e-2, atol=1e-4)


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


BAD_CHECKPOINTS = [
    # (what is wrong, state change, config change, message naming the key and the fix)
    ("unknown key", lambda s: {**s, "think_head.weight": torch.zeros(1)}, {}, r"unknown tensors \['think_head.weight'\]"),
    ("no end embedding", lambda s: _without(s, "end_embedding"), {}, r"missing tensor 'end_embedding'"),
    ("no layer weight", lambda s: _without(s, "model.layers.1.mlp.up_proj.weight"), {},
     r"missing tensors \['model.layers.1.mlp.up_proj.weight'\].*num_hidden_layers"),
    ("no head layer", lambda s: _without(s, "talk_head.0.4.weight"), {}, r"missing tensors \['talk_head.0.4.weight'\]"),
    ("transposed head", lambda s: {**s, "talk_head.0.0.weight": s["talk_head.0.0.weight"].T.contiguous()}, {},
     r"talk_head.0.0.weight has shape \(64, 32\).*implies \(32, 64\)"),
    ("delimiter shape", lambda s: {**s, "start_embedding": s["start_embedding"][:1]}, {},
     r"start_embedding has shape \(1, 32\), expected \[2, 32\]"),
    ("vocab disagrees", lambda s: s, {"vocab_size": V + 2}, r"model.embed_tokens.weight has shape \(98, 32\).*\(100, 32\)"),
    ("extra layer", lambda s: s, {"num_hidden_layers": 1}, r"do not exist in the model config.json describes"),
    ("other head", lambda s: s, {"use_shallow_talk": True}, r"use_shallow_talk = True; only the paper's mixing head"),
    ("not mistral", lambda s: s, {"model_type": "llama"}, r"model_type 'llama'.*from_base"),
]


@pytest.mark.parametrize("what, change_state, change_config, message", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_refused_clearly(what, change_state, change_config, message):
    config = official_config(**change_config)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConversionError, match=message):
        convert_official_checkpoint(change_state(official_state_dict()), config=config, n_ahead=N_AHEAD, **NO_TOKENIZER_IDS)


def test_bad_sources_are_refused_clearly(tmp_path, capsys):
    with pytest.raises(ConversionError, match="needs its config"):
        convert_official_checkpoint(official_state_dict())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="has no config.json"):
        convert_official_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(official_config()))
    with pytest.raises(ConversionError, match="no weights in"):
        convert_official_checkpoint(tmp_path / "empty", n_ahead=8)
    with pytest.raises(ConversionError, match="n_ahead = 3"):
        convert_official_checkpoint(official_state_dict(), config=official_config(max_thoughts=7), n_ahead=3, n_ahead_talk=3)
    # the command: exit code 2, one line naming the problem, nothing written over a non-empty DST
    src = write_checkpoint(tmp_path / "official")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert main([str(src), str(tmp_path / "taken"), "--n-ahead", "8"]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").exists()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out"), "--n-ahead", "8"]) == 2
    assert "quietstar-convert: error: no weights in" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_tokenizer_gets_the_delimiters_and_quietstar_eval_loads_the_result(tmp_path):
    from quietstar.loading import load_for_evaluation as load_model

    word_tokenizer(V - 2).save_pretrained(tmp_path / "tokenizer")
    src = write_checkpoint(tmp_path / "official")
    args = [str(src), str(tmp_path / "converted"), "--n-ahead", str(N_AHEAD), "--tokenizer", str(tmp_path / "tokenizer")]
    assert main(args) == 0
    model, tokenizer = load_model(str(tmp_path / "converted"))  # what quietstar-eval --model does
    assert tokenizer.convert_tokens_to_ids(["<|startthought|>", "<|endthought|>"]) == [V - 2, V - 1]
    assert (model.config.start_thought_token_id, model.config.end_thought_token_id) == (V - 2, V - 1)
    # a tokenizer that is not the checkpoint's (its delimiters would land elsewhere) is refused
    with pytest.raises(ConversionError, match=r"at ids \(50, 51\).*\(96, 97\).*base model's own tokenizer"):
        convert_official_checkpoint(src, n_ahead=N_AHEAD, tokenizer=word_tokenizer(50))


# ---------------------------------------------------------------------- as a new user meets it


def _conversion_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "max_thoughts" in str(w.message) or "no tokenizer" in str(w.message)]


@pytest.mark.parametrize("order", [OFFICIAL_ORDER, OFFICIAL_ORDER[::-1]], ids=["start-end", "end-start"])
def test_official_checkpoint_with_its_tokenizer_converts_as_the_released_model(tmp_path, capsys, order):
    state = official_state_dict(seed=3)
    tokenizer = word_tokenizer(V - 2, added_tokens=order)
    assert len(tokenizer) == V  # the official script resized the table to the tokenizer
    src = write_checkpoint(tmp_path / "official", state, tokenizer=tokenizer)
    start_id, end_id = tokenizer.convert_tokens_to_ids(list(OFFICIAL_ORDER))  # how the official code finds them

    # max_thoughts = 10 fits n_ahead 8 (eval script, n_ahead_talk 1) and 5 (training, 4): no guessing
    assert main([str(src), str(tmp_path / "guessed")]) == 2
    error = capsys.readouterr().err
    assert f"max_thoughts = {EVAL_MAX_THOUGHTS}" in error and "--n-ahead 8" in error and "N = 8 - 3 = 5" in error
    assert not (tmp_path / "guessed").exists()

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main([str(src), str(tmp_path / "converted"), "--n-ahead", "8"]) == 0
    assert _conversion_warnings(record) == []  # max_thoughts 10 is what an 8-ahead model loaded for eval records
    assert f"N = 5 thought tokens, K = 4, delimiter ids ({start_id}, {end_id})" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "converted")
    cfg = model.config
    assert (cfg.n_thought_tokens, cfg.n_talk_tokens) == (5, 4)
    assert (cfg.start_thought_token_id, cfg.end_thought_token_id) == (start_id, end_id)
    assert saved_tokenizer.convert_tokens_to_ids(list(OFFICIAL_ORDER)) == [start_id, end_id]
    # what the model feeds for each delimiter id is the official start_embedding[0] * embedding_scale
    # (100): one fp32 product each side, so fp32 rounding of values ~1 bounds the difference
    fed = model.get_input_embeddings()(torch.tensor([start_id, end_id]))
    official = torch.stack([state["start_embedding"][0], state["end_embedding"][0]]) * 100
    torch.testing.assert_close(fed, official, rtol=1.3e-6, atol=1e-6)
    for i in (0, 2, 4):  # copied, never computed: bit equality is the claim
        assert torch.equal(model.mixing_head.mlp[i].weight, state[f"talk_head.0.{i}.weight"])
    for i in (0, 2):
        assert torch.equal(model.mixing_head.mlp[i].bias, state[f"talk_head.0.{i}.bias"])


def test_without_a_tokenizer_the_assumed_delimiter_order_is_said():
    with pytest.warns(UserWarning, match=rf"no tokenizer: assuming .*<\|startthought\|> = {V - 2} and <\|endthought\|> = "
                                         rf"{V - 1}.*--tokenizer"):
        model = convert_official_checkpoint(official_state_dict(), config=official_config(), n_ahead=8)
    assert (model.config.start_thought_token_id, model.config.end_thought_token_id) == (V - 2, V - 1)
    with pytest.raises(ConversionError, match=r"does not record n_ahead.*--n-ahead 8"):
        convert_official_checkpoint(official_state_dict(), config=official_config(max_thoughts=None))


INCONSISTENT_TOKENIZERS = [
    # (what is wrong, tokenizer, message)
    ("one delimiter", lambda: word_tokenizer(V - 2, added_tokens=["<|endthought|>"]),
     rf"has <\|endthought\|> \(id {V - 2}\) but not <\|startthought\|>"),
    ("beyond the table", lambda: word_tokenizer(V, added_tokens=OFFICIAL_ORDER),
     rf"<\|startthought\|> at id {V}, outside the checkpoint's {V}-row table"),
    ("more tokens than rows", lambda: word_tokenizer(V - 2, added_tokens=[*OFFICIAL_ORDER, "<|extra|>"]),
     rf"has {V + 1} tokens, more than the checkpoint's {V}-row table"),
]


@pytest.mark.parametrize("what, make_tokenizer, message", INCONSISTENT_TOKENIZERS, ids=[t[0] for t in INCONSISTENT_TOKENIZERS])
def test_inconsistent_tokenizers_are_refused_clearly(what, make_tokenizer, message):
    with pytest.raises(ConversionError, match=message):
        convert_official_checkpoint(official_state_dict(), config=official_config(), n_ahead=8, tokenizer=make_tokenizer())
