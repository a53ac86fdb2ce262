"""Thinking generate() on a preallocated cache (decode="static") and with the compiled single-token
step (decode="compiled"): greedy outputs equal the growing-cache path (decode="dynamic").

The three paths run the same decoder on the same inputs; the static cache attends over all its slots
with the stale ones masked, so logits differ from the dynamic path only by fp32 rounding (a sum over
more, exactly-zero-weighted keys), and greedy tokens and thoughts must be equal; the mixing weights
agree within 1e-5 (a sigmoid of O(1) fp32 values)."""

import pytest
import torch

from quietstar.static_decoding import StaticDecoding
from test_generation import thinking_model
from tiny_models import padded_batch, tiny_base

GREEDY = dict(max_new_tokens=6, do_sample=False, return_thoughts=True, pad_token_id=0)


def generate_all(model, modes, padded, device="cpu"):
    ids, mask = (x.to(device) for x in padded_batch(3, 9, "left", seed=1, n_pad=(3, 0, 5) if padded else (0,)))
    return {mode: model.generate(ids, attention_mask=mask, decode=mode, **GREEDY) for mode in modes}


def assert_same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.thought_ids, ref.thought_ids)
    torch.testing.assert_close(out.mixing_weights, ref.mixing_weights, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_static_cache_greedy_equals_dynamic(padded):
    model = thinking_model("llama")
    outs = generate_all(model, ("dynamic", "static", "static"), padded)  # the second static call reuses the cache
    assert_same(outs["static"], outs["dynamic"])
    held = model._quietstar_static_decoding
    assert held.key == (3, False) and held.max_len == 9 + 6 + 3 + 2  # prompt + new + sot/N/eot of the last thought
    assert int(held.cache.layers[0].get_seq_length()) == 9 + 6  # prompt + emitted tokens: thoughts rewound


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# torch.compile (inductor) on a CPU: 15-90 s on the 2-core CI machine; on a GPU: CUDA graphs (gpu_check.sh)
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_compiled_step_greedy_equals_dynamic_and_is_built_once(device):
    model = thinking_model("llama").to(device)
    outs = generate_all(model, ("dynamic", "compiled"), padded=True, device=device)
    assert_same(outs["compiled"], outs["dynamic"])
    first = model._quietstar_static_decoding
    again = generate_all(model, ("compiled",), padded=True, device=device)["compiled"]
    assert model._quietstar_static_decoding is first and torch.equal(again.sequences, outs["dynamic"].sequences)


def test_bad_decode_settings_are_refused():
    model = thinking_model("llama")
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(ValueError, match="decode must be 'dynamic', 'static' or 'compiled'"):
        model.generate(ids, max_new_tokens=2, pad_token_id=0, decode="graphs")
    with pytest.raises(ValueError, match="sliding window"):
        base = tiny_base("mistral")
        base.config.sliding_window = 4
        StaticDecoding(base.model, 1, 16, compiled=False)
