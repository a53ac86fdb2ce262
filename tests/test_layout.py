import pytest
import torch

from quietstar.layout import ThoughtLayout, base_position_ids, n_extra_steps, step_of, useful_entries, visibility_mask


def test_extra_steps_count_and_step_indices():
    assert n_extra_steps(9, 4) == 14  # reference: n_ahead 12 + n_ahead_talk 4 - 2
    assert n_extra_steps(1, 1) == 3
    assert step_of.thought(1) == 2 and step_of.end_thought(9) == 11 and step_of.talk(9, 3) == 14
    with pytest.raises(ValueError, match="n_thought_tokens"):
        n_extra_steps(0, 4)
    with pytest.raises(ValueError, match="n_talk_tokens"):
        n_extra_steps(3, 0)


def test_position_ids_from_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert base_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]


def test_visibility_rule_by_enumeration():
    L, nk = 4, 3
    pad = torch.tensor([[True, False, True, True]])
    mask = visibility_mask(L, nk, pad)[0]
    for q in range(nk * L):
        for k in range(nk * L):
            qs, qi, ks, kj = q // L, q % L, k // L, k % L
            expected = pad[0, kj].item() and ((ks == 0 and kj <= qi) or (kj == qi and 1 <= ks <= qs))
            assert mask[q, k].item() == expected, (q, k)
    # the base block is plain causal attention
    assert torch.equal(visibility_mask(L, 1)[0], torch.ones(L, L, dtype=torch.bool).tril())
    # cached calls: queries are the last steps
    assert torch.equal(visibility_mask(L, nk, pad, first_query_step=2)[0], mask[2 * L:])


def test_layout_rejects_partial_steps():
    with pytest.raises(ValueError, match="whole steps"):
        ThoughtLayout(5).steps(7, 10)
    assert ThoughtLayout(5).steps(5, 15) == (2, 3)


@pytest.mark.parametrize("L, nk, nq, pad", [(7, 3, 3, False), (11, 5, 2, True), (5, 1, 1, True)])
def test_useful_entries_count_exactly_the_visible_entries(L, nk, nq, pad):
    mask = None
    if pad:
        mask = torch.ones(2, L, dtype=torch.bool)
        mask[0, :2] = False
        mask[1, -1] = False
    dense = visibility_mask(L, nk, mask, first_query_step=nk - nq)
    want = int(dense.sum()) if mask is not None else 2 * int(dense.sum())
    assert useful_entries(L, nk, nq, batch=2, key_padding_mask=mask) == want
    # Closed form used for the big benchmark shapes (no padding).
    if mask is None:
        assert useful_entries(L, nk, nq, batch=2) == want


def test_triton_is_available_reports_a_reason():
    """Needs no Triton: the answer is a reason either way (and never imports the kernels)."""
    import triton_kernels

    ok, reason = triton_kernels.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
