"""The thought-length curriculum: validation, N as a pure function of the step, and a model whose N
changes between forwards computing what a model built with that N computes."""

import os

import pytest
import torch
from tiny_models import padded_batch, tiny_base

from quietstar import QuietStarForCausalLM
from quietstar.training.curriculum import ThoughtSchedule, ThoughtStage, set_n_thought_tokens, thinking_model

STAGES = [{"from_step": 0, "n_thought_tokens": 16}, {"from_step": 400, "n_thought_tokens": 12},
         {"from_step": 800, "n_thought_tokens": 8}]


def schedule(*stages, allow_increase=False):
    return ThoughtSchedule([ThoughtStage(step, n) for step, n in stages], allow_increase=allow_increase)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad, message", [
    (ThoughtSchedule([]), r"thought.schedule.stages is empty; list at least one stage"),
    (schedule((5, 16), (10, 8)), r"stages\[0\].from_step must be 0 .* got 5"),
    (schedule((0, 16), (10, 0)), r"stages\[1\].n_thought_tokens must be >= 1, got 0"),
    (schedule((0, 16), (10, 12), (10, 8)), r"stages\[2\].from_step 10 must be greater than stages\[1\]'s 10"),
    (schedule((0, 16), (20, 12), (10, 8)), r"stages\[2\].from_step 10 must be greater than stages\[1\]'s 20"),
    (schedule((0, 8), (10, 12)), r"stages\[1\].n_thought_tokens 12 is longer than stages\[0\]'s 8: .*allow_increase: true"),
    (ThoughtSchedule([{"from_step": 0}]), r"stages\[0\] has no n_thought_tokens"),
    (ThoughtSchedule([{"from_step": 0, "n_thought_tokens": 2.5}]), r"stages\[0\].n_thought_tokens must be an integer, got 2.5"),
    (ThoughtSchedule([{"from_step": True, "n_thought_tokens": 2}]), r"stages\[0\].from_step must be an integer, got True"),
])
def test_validation_names_the_problem_and_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        bad.validate()
    with pytest.raises(ValueError, match=message):  # nothing is read from an invalid schedule
        bad.n_thought_tokens_at(0)


def test_every_problem_is_reported_at_once():
    problems = schedule((3, 0), (3, 4)).problems()
    assert len(problems) == 4  # first step not 0, N 0, steps not increasing, N increasing
    assert all(p.startswith("thought.schedule.stages[") for p in problems)


def test_valid_schedules_pass():
    assert ThoughtSchedule(STAGES).problems() == []
    assert schedule((0, 4)).problems() == []
    assert schedule((0, 4), (5, 4)).problems() == []  # equal lengths are not an increase
    assert schedule((0, 4), (5, 8), allow_increase=True).problems() == []


# ---------------------------------------------------------------------- N as a function of the step


def test_n_at_each_step_of_a_three_stage_schedule():
    stages = ThoughtSchedule(STAGES)
    expected = {0: 16, 1: 16, 399: 16, 400: 12, 401: 12, 799: 12, 800: 8, 10**6: 8}
    assert {step: stages.n_thought_tokens_at(step) for step in expected} == expected
    assert stages.max_n_thought_tokens == 16
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        stages.n_thought_tokens_at(-1)


def test_n_is_a_pure_function_of_the_step():
    """What resume relies on: no state, so a schedule rebuilt from the saved config (another object,
    queried in another order, after other queries) gives every step the same N."""
    steps = list(range(0, 1000, 7))
    first = ThoughtSchedule(STAGES)
    forward = [first.n_thought_tokens_at(s) for s in steps]
    again = [first.n_thought_tokens_at(s) for s in steps]
    rebuilt = ThoughtSchedule(**first.to_dict())  # the config as written to config.yaml and read back
    backward = [rebuilt.n_thought_tokens_at(s) for s in reversed(steps)][::-1]
    assert forward == again == backward
    assert sorted(set(forward), reverse=True) == [16, 12, 8]


# ---------------------------------------------------------------------- the model


def thinking(n=4, layers=2, **settings):
    model = QuietStarForCausalLM.from_base(tiny_base("llama", hidden_size=64, num_hidden_layers=layers), n_thought_tokens=n, n_talk_tokens=2,
                                           policy_loss_weight=1.0, **settings)
    with torch.no_grad():  # thoughts matter to the loss (a zero last layer mixes them out)
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group, so that a real DistributedDataParallel can wrap a model on the CPU."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_before_step_sets_n_through_wrappers_and_returns_it(single_process_group):
    model = thinking(n=16)
    wrapped = torch.compile(torch.nn.parallel.DistributedDataParallel(model))  # compile only wraps here: nothing runs
    assert thinking_model(wrapped) is model
    stages = ThoughtSchedule(STAGES)
    for step, n in ((0, 16), (400, 12), (799, 12), (800, 8), (3, 16)):
        assert stages.before_step(step, wrapped) == n
        assert model.config.n_thought_tokens == n


def test_before_step_refuses_a_model_without_thoughts():
    with pytest.raises(TypeError, match="thinking: false trains the plain base LM"):
        ThoughtSchedule(STAGES).before_step(0, tiny_base("llama"))
    with pytest.raises(ValueError, match="n_thought_tokens must be an integer >= 1"):
        set_n_thought_tokens(thinking(), 0)


def test_check_fits_uses_the_longest_stage():
    model = thinking()  # max_position_embeddings 128, K = 2: S = N + 3 extra positions
    schedule((0, 16), (5, 8)).check_fits(model, 128 - 19)
    with pytest.raises(ValueError, match=r"longest stage \(N = 16\): sequence too long"):
        schedule((0, 16), (5, 8)).check_fits(model, 128 - 18)
    schedule((0, 8)).check_fits(model, 128 - 18)


def step_outputs(model, seed, batch, backward):
    """Loss, thoughts and gradients of one training forward (memory-light, as the loop runs it)."""
    ids, mask = batch
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(seed), return_logits=False)
    if backward:
        out.loss.backward()
    return out.loss.detach(), out.thought_ids, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_switching_matches_fresh_models(ns, batch=(2, 6), backward=True, layers=2, **settings):
    """One model run at each N of ``ns`` in turn (caches warm from the previous N) against a model
    built with that N and the same weights. Same code path, inputs and seeds on both sides, so the
    values agree to the last bit in practice; the tolerance is fp32's default only to stay robust."""
    model = thinking(n=ns[0], layers=layers, **settings)
    batch = padded_batch(*batch, "left", seed=5, n_pad=(1, 0))
    curriculum = schedule(*enumerate(ns), allow_increase=True)
    for step, n in enumerate(ns):
        assert curriculum.before_step(step, model) == n
        loss, thoughts, grads = step_outputs(model, step, batch, backward)
        fresh = thinking(n=n, layers=layers, **settings)
        fresh.load_state_dict(model.state_dict())
        fresh_loss, fresh_thoughts, fresh_grads = step_outputs(fresh, step, batch, backward)
        assert thoughts.shape[-1] == n
        assert torch.equal(thoughts, fresh_thoughts)
        torch.testing.assert_close(loss, fresh_loss)
        assert grads.keys() == fresh_grads.keys() and (len(grads) > 0) == backward
        for name in grads:
            torch.testing.assert_close(grads[name], fresh_grads[name], msg=lambda m: f"N {n}, {name}: {m}")


# A small logits_chunk_elements splits the memory-light loss into several chunks per call.
@pytest.mark.parametrize("thought_forward", ["replay", "incremental"])
def test_changing_n_between_forwards_equals_a_fresh_model_torch(thought_forward):
    assert_switching_matches_fresh_models((4, 2, 3), thought_forward=thought_forward, logits_chunk_elements=300)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1 (set in conftest on CPU machines)")
def test_changing_n_between_forwards_equals_a_fresh_model_triton():
    import triton_kernels

    import quietstar.attention as attention

    attention._triton_op.cache_clear()
    assert attention._triton_op() is triton_kernels.thought_attention, "quietstar_triton fell back to quietstar_torch"
    # The interpreter runs ~10 s per forward and backward of this model: forwards only (sampling
    # loop and replay, where N reaches the kernel's launch), one short row.
    assert_switching_matches_fresh_models((3, 2), batch=(1, 4), backward=False, layers=1,
                                          attn_implementation="quietstar_triton", n_passes=1)
