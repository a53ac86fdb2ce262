"""optim.global_batch: the documents of one optimiser step whatever the process count; data.max_documents:
a budget the run never repeats."""

import json
import warnings

import pytest
from distributed_runs import ROOT, run, trace

from quietstar.training.batch import batch_plan, check_budget
from quietstar.training.cli import main
from quietstar.training.config import ConfigError
from quietstar.training.config_loading import load_config
from quietstar.training.data import PackedDataset, build_dataset
from quietstar.assets import byte_tokenizer

RECIPE = ROOT / "train" / "configs" / "mistral7b_openwebmath.yaml"
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"


def test_the_recipe_trains_8_documents_per_step_on_any_process_count():
    cfg = load_config(RECIPE)
    splits = {w: (p.global_batch, p.batch_size, p.grad_accum) for w in (1, 2, 4, 8) for p in [batch_plan(cfg, w)]}
    assert splits == {1: (8, 4, 2), 2: (8, 4, 1), 4: (8, 2, 1), 8: (8, 1, 1)}  # 1 process: the reference's 4 x 2
    assert batch_plan(cfg, 1).tokens_per_step == 8 * 256
    for world in (1, 2, 4, 8):
        check_budget(cfg, batch_plan(cfg, world))  # 100 steps x 8 = 800 of the 1000 documents
    for world in (3, 16):
        with pytest.raises(ConfigError, match=f"global_batch 8 .* cannot be split evenly over {world} processes; launch 1, 2, 4, 8"):
            batch_plan(cfg, world)


def test_a_run_past_the_document_budget_is_refused_before_it_starts():
    with pytest.raises(ConfigError, match=r"optim.steps 126 x 8 .* = 1008 windows.*data.max_documents 1000.*Lower optim.steps to 125"):
        check_budget(load_config(RECIPE, ["optim.steps=126"]), batch_plan(load_config(RECIPE), 1))
    # The per-process batch of old: 4 x 2 on each of 8 processes reads 6400 documents in 100 steps.
    per_process = load_config(RECIPE, ["optim.global_batch=null", "optim.grad_accum=2"])
    check_budget(per_process, batch_plan(per_process, 1))
    with pytest.raises(ConfigError, match="= 6400 windows.*set optim.global_batch"):
        check_budget(per_process, batch_plan(per_process, 8))
    # Packed windows are counted once the data is built.
    packed = load_config(TINY, ["data.max_documents=10", "optim.global_batch=4"])
    check_budget(packed, batch_plan(packed, 1))
    with pytest.raises(ConfigError, match="the data budget is 20 windows of the first 10 documents"):
        check_budget(packed, batch_plan(packed, 1), windows=20)


def test_the_cli_refuses_a_split_before_launching(capsys):
    cpu_2proc = ROOT / "train" / "accelerate" / "cpu_2proc.yaml"
    assert main(["--config", str(TINY), "--set", "optim.global_batch=3", "--accelerate-config", str(cpu_2proc)]) == 2
    assert "cannot be split evenly over 2 processes" in capsys.readouterr().err


def _docs(folder, n_files=8, per_file=10):
    folder.mkdir()
    for f in range(n_files):
        rows = [{"text": f"document {f * per_file + i}: " + "word " * (i % 5 + 2)} for i in range(per_file)]
        (folder / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_streamed_budget_reads_the_same_documents_per_step_on_any_process_count(tmp_path):
    # 8 files = 8 shards: split_dataset_by_node would deal whole shards to 8 processes, so which documents a
    # step reads would depend on the process count. A budget is read once and kept instead.
    docs = _docs(tmp_path / "docs")
    cfg = load_config(TINY, [f"data.path={docs}", "data.streaming=true", "data.max_documents=40", "data.windows=document",
                             "data.seq_len=32", "optim.global_batch=8", "optim.batch_size=4"])
    tok, steps = byte_tokenizer(), 5
    per_world = {}
    for world in (1, 2, 4, 8):
        plan = batch_plan(cfg, world)
        ranks = [build_dataset(cfg.data, tok, batch_size=plan.batch_size, rank=r, world_size=world, seed=0) for r in range(world)]
        assert all(isinstance(d, PackedDataset) for d in ranks)
        per_world[world] = [sorted(i for d in ranks for _ in range(plan.grad_accum) for i in d.next_batch()["sample_ids"])
                            for _ in range(steps)]
    assert per_world[2] == per_world[4] == per_world[8] == per_world[1]
    read = [i for step in per_world[1] for i in step]
    assert sorted(read) == list(range(40)), "5 steps x 8 read each of the 40 budgeted documents once"


def test_past_the_budget_the_data_stops_and_without_one_a_repeat_is_announced(tmp_path):
    docs = _docs(tmp_path / "docs", n_files=1, per_file=6)
    tok = byte_tokenizer()
    budget = load_config(TINY, [f"data.path={docs}", "data.max_documents=6", "data.windows=document", "data.seq_len=32"])
    data = build_dataset(budget.data, tok, batch_size=2, rank=0, world_size=1, seed=0)
    assert sorted(i for _ in range(3) for i in data.next_batch()["sample_ids"]) == list(range(6))
    with pytest.raises(ConfigError, match="data.max_documents 6 documents have been trained on; the run stops"):
        data.next_batch()
    free = load_config(TINY, [f"data.path={docs}", "data.windows=document", "data.seq_len=32"])
    data = build_dataset(free.data, tok, batch_size=2, rank=0, world_size=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [data.next_batch() for _ in range(3)]
    with pytest.warns(UserWarning, match="epoch 2 repeats them"):
        data.next_batch()


def test_two_processes_train_the_global_batch_of_one(tmp_path):
    sets = ["optim.global_batch=4", "optim.steps=2", "checkpoint.every=0", "checkpoint.export=false"]
    one, two = run("ddp1", tmp_path / "one", *sets), run("ddp2", tmp_path / "two", *sets)
    assert one.stdout.splitlines()[0].startswith("global batch 4 documents per optimiser step "
                                                 "(1 process x 2 per micro-batch x 2 accumulated), 192 tokens per step")
    assert two.stdout.splitlines()[0].startswith("global batch 4 documents per optimiser step "
                                                 "(2 processes x 2 per micro-batch x 1 accumulated), 192 tokens per step")
    single, ranks = trace(tmp_path / "one"), [trace(tmp_path / "two", r) for r in (0, 1)]
    for step in range(2):
        windows = sorted(i for micro in single[step]["sample_ids"] for i in micro)
        assert len(windows) == 4
        assert sorted(i for r in ranks for micro in r[step]["sample_ids"] for i in micro) == windows
