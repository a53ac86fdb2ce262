"""Resuming with another process count (DDP 2 -> 1, FSDP2 2 -> 1): the data continues at the same window
of the global order; the restored weights and schedule are the checkpoint's."""

import pytest
from distributed_runs import STEPS, TINY, run, run_once, trace

from quietstar.training.config_loading import load_config
from quietstar.training.data import build_dataset
from quietstar.assets import byte_tokenizer

CHECKPOINT_STEP = 2
# Thought sampling is re-seeded, so only the first resumed step's base NLL (a function of the
# restored weights and the windows alone) is comparable; it differs only by the order in which
# per-micro-batch means are averaged (over 2 ranks x 2, or over 4 on one process).
NLL_RTOL = 1e-6


def _interleaved(windows_by_rank: list[list[list[int]]]) -> list[int]:
    """Windows of one step in global order: micro-batch by micro-batch, rank by rank within each."""
    return [i for micro in zip(*windows_by_rank) for batch in micro for i in batch]


def test_global_order_does_not_depend_on_the_process_count():
    cfg, tokenizer = load_config(TINY), byte_tokenizer()

    def make(rank, world):
        return build_dataset(cfg.data, tokenizer, batch_size=2, rank=rank, world_size=world, seed=0)

    single = make(0, 1)
    reference = [i for _ in range(12) for i in single.next_batch()["sample_ids"]]  # 24 windows, one process
    two = [make(r, 2) for r in (0, 1)]
    seen = [i for _ in range(3) for d in two for i in d.next_batch()["sample_ids"]]  # 12 windows on two
    three = [make(r, 3) for r in (0, 1, 2)]
    for d in three:
        d.load_state_dict(two[0].state_dict())
    seen += [i for _ in range(2) for d in three for i in d.next_batch()["sample_ids"]]  # the next 12 on three
    assert seen == reference
    assert three[0].state_dict()["windows_consumed"] == 24


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_resumed_by_one_continue_the_global_order(sharded, tmp_path, tmp_path_factory):
    reference = run_once("fsdp2" if sharded else "ddp2", tmp_path_factory, "fsdp2" if sharded else "ddp2")
    checkpoint = reference / "checkpoints" / f"step-{CHECKPOINT_STEP:08d}"
    out = tmp_path / "one"
    # grad_accum 2 -> 4 keeps the windows per optimiser step (batch x processes x grad_accum) at 8.
    proc = run("fsdp1" if sharded else "ddp1", out, f"resume={checkpoint}", "optim.grad_accum=4")
    assert "written by 2 processes, resumed by 1" in proc.stderr
    assert "windows per optimiser step" not in proc.stderr

    two, one = [trace(reference, r) for r in (0, 1)], trace(out)
    assert [t["step"] for t in one] == list(range(CHECKPOINT_STEP + 1, STEPS + 1))
    for step, resumed in zip(range(CHECKPOINT_STEP + 1, STEPS + 1), one):
        expected = _interleaved([t["sample_ids"] for r in (0, 1) for t in two[r] if t["step"] == step])
        assert [i for batch in resumed["sample_ids"] for i in batch] == expected, f"step {step}: data position lost"
    first, before = one[0]["metrics"], next(t for t in two[0] if t["step"] == CHECKPOINT_STEP + 1)["metrics"]
    assert first["lr"] == before["lr"]
    assert abs(first["nll_base"] - before["nll_base"]) <= NLL_RTOL * before["nll_base"], (first["nll_base"], before["nll_base"])
