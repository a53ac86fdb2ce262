"""quietstar-convert: a tiny random checkpoint written by hand in the official code's layout
(ezelikman/quiet-star ``modeling_mistral.py`` saved by transformers 4.37) converts exactly, runs,
and anything else is refused with the offending key and the fix."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import quietstar  # noqa: F401  (registers the quietstar model type)
from quietstar.convert import ConversionError, convert_official_checkpoint, main
from tiny_models import tiny_base

H, V, N_AHEAD, N_AHEAD_TALK = 32, 98, 6, 3  # V = 96 tokens + <|startthought|>, <|endthought|>


def official_config(**changes) -> dict:
    """config.json as the official MistralConfig (transformers 4.37) writes it."""
    cfg = {
        "_name_or_path": "mistralai/Mistral-7B-v0.1", "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": H, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
        "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.37.2", "use_cache": True, "vocab_size": V,
        "max_thoughts": N_AHEAD + N_AHEAD_TALK + 1,
        "merged_talk_heads": True, "merged_lm_and_talk_heads": False, "merged_lm_and_think_heads": True,
        "use_concat_talk_head": True, "use_shallow_think": True, "use_shallow_talk": False,
        "use_complex_think_head": False, "use_complex_talk_head": True, "use_weighted_talk_head": True,
    }
    cfg.update(changes)
    return cfg


def official_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Mistral weights + the official start/end embeddings and talk head, every tensor random."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in tiny_base("mistral", vocab_size=V).state_dict().items()}
    state["start_embedding"] = torch.randn(2, H, generator=g) / 100  # row 0: vector / embedding_scale; row 1: log std
    state["end_embedding"] = torch.randn(2, H, generator=g) / 100
    state["talk_head.0.0.weight"] = torch.randn(H, 2 * H, generator=g) * 0.02
    state["talk_head.0.0.bias"] = torch.randn(H, generator=g) * 0.02
    state["talk_head.0.2.weight"] = torch.randn(H, H, generator=g) * 0.02
    state["talk_head.0.2.bias"] = torch.randn(H, generator=g) * 0.02
    state["talk_head.0.4.weight"] = torch.randn(1, H, generator=g)  # trained: not zero
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def write_checkpoint(folder, state=None, config=None, shards: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    state = official_state_dict() if state is None else state
    (folder / "config.json").write_text(json.dumps(official_config() if config is None else config))
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    keys, weight_map = sorted(state), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


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
    model = convert_official_checkpoint(write_checkpoint(tmp_path / "official", state, shards=shards), n_ahead_talk=N_AHEAD_TALK)
    assert_exact_copy(model, state)
    cfg = model.config
    assert (cfg.n_thought_tokens, cfg.n_talk_tokens) == (N_AHEAD - 3, N_AHEAD_TALK)  # n_ahead from max_thoughts
    assert (cfg.start_thought_token_id, cfg.end_thought_token_id) == (V - 2, V - 1)
    assert cfg.embedding_scale == 100.0 and cfg.mixing_head_activation == "none"
    # the vectors the model feeds are the official ones: stored / 100, multiplied back
    torch.testing.assert_close(model.delimiter_embedding.effective_delimiters()[0], state["start_embedding"][0] * 100)


def test_converted_model_runs_and_round_trips_through_save_pretrained(tmp_path):
    state = official_state_dict()
    model = convert_official_checkpoint(write_checkpoint(tmp_path / "official", state), n_ahead_talk=N_AHEAD_TALK, n_passes=1)
    ids = torch.randint(3, V - 2, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss) and out.thought_ids.shape == (2, 10, N_AHEAD - 3)
    assert out.mixing_weights.abs().sum() > 0  # the trained head is used, not re-initialised
    assert not ((out.thought_ids == V - 2) | (out.thought_ids == V - 1)).any()  # delimiters are never sampled
    # the delimiter ids inside the table read the checkpoint's vectors, not the table's rows
    torch.testing.assert_close(model.get_input_embeddings()(torch.tensor([V - 1])), state["end_embedding"][:1] * 100)

    assert main([str(tmp_path / "official"), str(tmp_path / "converted"), "--n-ahead-talk", str(N_AHEAD_TALK)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert_exact_copy(reloaded, state)
    assert not list(tmp_path.glob(".converted.*"))  # the staging folder is gone


def test_dtype_embedding_scale_and_explicit_n_ahead(tmp_path):
    state = official_state_dict(dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="max_thoughts = 10 was set for n_ahead \\+ n_ahead_talk = 9, not 8 \\+ 4"):
        model = convert_official_checkpoint(state, config=official_config(), n_ahead=8, n_ahead_talk=4, embedding_scale=10.0)
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
    ("no n_ahead", lambda s: s, {"max_thoughts": None}, r"pass n_ahead \(--n-ahead 8"),
]


@pytest.mark.parametrize("what, change_state, change_config, message", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_refused_clearly(what, change_state, change_config, message):
    config = official_config(**change_config)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConversionError, match=message):
        convert_official_checkpoint(change_state(official_state_dict()), config=config)


def test_bad_sources_are_refused_clearly(tmp_path, capsys):
    with pytest.raises(ConversionError, match="needs its config"):
        convert_official_checkpoint(official_state_dict())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="has no config.json"):
        convert_official_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(official_config()))
    with pytest.raises(ConversionError, match="no weights in"):
        convert_official_checkpoint(tmp_path / "empty")
    with pytest.raises(ConversionError, match="n_ahead = 3"):
        convert_official_checkpoint(official_state_dict(), config=official_config(max_thoughts=7), n_ahead=3, n_ahead_talk=3)
    # the command: exit code 2, one line naming the problem, nothing written over a non-empty DST
    src = write_checkpoint(tmp_path / "official")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert main([str(src), str(tmp_path / "taken")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").exists()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "quietstar-convert: error: no weights in" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _word_tokenizer(n_words: int):
    """An offline fast tokenizer: words t0..t{n-1} (t0 = <unk>, t1 = <s>, t2 = </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, n_words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_tokenizer_gets_the_delimiters_and_quietstar_eval_loads_the_result(tmp_path):
    from quietstar.evaluation.cli import load_model

    _word_tokenizer(V - 2).save_pretrained(tmp_path / "tokenizer")
    src = write_checkpoint(tmp_path / "official")
    args = [str(src), str(tmp_path / "converted"), "--n-ahead-talk", str(N_AHEAD_TALK), "--tokenizer", str(tmp_path / "tokenizer")]
    assert main(args) == 0
    model, tokenizer = load_model(str(tmp_path / "converted"))  # what quietstar-eval --model does
    assert tokenizer.convert_tokens_to_ids(["<|startthought|>", "<|endthought|>"]) == [V - 2, V - 1]
    assert (model.config.start_thought_token_id, model.config.end_thought_token_id) == (V - 2, V - 1)
    # a tokenizer that is not the checkpoint's (its delimiters would land elsewhere) is refused
    with pytest.raises(ConversionError, match=r"at ids \(50, 51\).*\(96, 97\).*base model's own tokenizer"):
        convert_official_checkpoint(src, n_ahead_talk=N_AHEAD_TALK, tokenizer=_word_tokenizer(50))
