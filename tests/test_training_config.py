"""The run config, input validation and checkpoint discovery (in-process, no training)."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from quietstar import QuietStarConfig
from quietstar.training.checkpoint import CheckpointWarning, complete_checkpoints, latest_checkpoint
from quietstar.training.cli import check_accelerate_config, main
from quietstar.training.config import ConfigError, RunConfig, ThoughtConfig, runtime_thought_fields
from quietstar.training.config_checks import validate
from quietstar.training.config_loading import load_config, save_config
from quietstar.training.data import build_dataset
from quietstar.training.loop import train
from quietstar.training.optimizer import lr_lambda
from quietstar.assets import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train" / "configs").glob("*.yaml"))
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_local_recipes_validate():
    for name in ("cpu_default.yaml", "tiny_test.yaml"):
        validate(load_config(ROOT / "train" / "configs" / name))


def test_overrides_are_typed():
    cfg = load_config(TINY, ["optim.lr=3e-4", "logging.trackers=[]", "data.seq_len=40", "model.gradient_checkpointing=true"])
    assert cfg.optim.lr == 3e-4 and cfg.logging.trackers == [] and cfg.data.seq_len == 40
    assert cfg.model.gradient_checkpointing is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1e-5"], "did you mean 'lr'"),
        (["optimm.lr=1e-5"], "did you mean 'optim'"),
        (["optim.steps=ten"], "optim.steps must be an integer"),
        (["optim.steps=2.5"], "optim.steps must be an integer"),
        (["thought.clip_negative_advantages=maybe"], "must be true or false"),
        (["optim.mixed_precision=fp8"], "must be one of"),
        (["optim"], "expects key=value"),
    ],
)
def test_bad_keys_and_types(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("thought:\n  n_thoughts_tokens: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'n_thought_tokens'"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.path=/nonexistent/corpus.txt"], "does not exist"),
        (["data.seq_len=5", "thought.n_talk_tokens=4"], r"shorter than n_talk_tokens \+ 2 = 6"),
        (["model.path=./no/such/model"], "model.path './no/such/model' does not exist"),
        (["model.attn_implementation=sdpa"], "not a thought attention path"),
        (["resume=/no/such/checkpoint"], "resume"),
        (["thought.thought_forward=incremental", "model.gradient_checkpointing=true"], "cannot recompute"),
    ],
)
def test_bad_inputs_fail_before_work(overrides, message, tmp_path, capsys):
    out_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        validate(load_config(TINY, overrides))
    # The CLI reports the same error, exit code 2, and creates nothing.
    assert main(["--config", str(TINY), "--set", f"output_dir={out_dir}", *sum((["--set", o] for o in overrides), [])]) == 2
    assert "quietstar-train: error: invalid run config" in capsys.readouterr().err
    assert not out_dir.exists()


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        validate(load_config(TINY, [f"data.path={empty}"]))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "   "}\n{"text": ""}\n')
    cfg = load_config(TINY, [f"data.path={blank}"])
    validate(cfg)  # not empty on disk: the packed dataset finds no text

    with pytest.raises(ConfigError, match="empty dataset"):
        build_dataset(cfg.data, byte_tokenizer(), batch_size=1, rank=0, world_size=1, seed=0)
    wrong_field = tmp_path / "other.jsonl"
    wrong_field.write_text('{"content": "hello"}\n')
    with pytest.raises(ConfigError, match="columns are"):
        build_dataset(load_config(TINY, [f"data.path={wrong_field}"]).data, byte_tokenizer(), batch_size=1, rank=0, world_size=1, seed=0)


def test_accelerate_config_with_more_processes_than_devices(tmp_path):
    bad = tmp_path / "many.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: 4096\nnum_machines: 1\nuse_cpu: false\n")
    with pytest.raises(ConfigError, match="names 4096 processes"):
        check_accelerate_config(bad)
    trap = tmp_path / "cpu_trap.yaml"
    trap.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    with pytest.raises(ConfigError, match="ONE process"):
        check_accelerate_config(trap)
    check_accelerate_config(ROOT / "train" / "accelerate" / "cpu_2proc.yaml")
    assert main(["--config", str(TINY), "--accelerate-config", str(bad)]) == 2


def test_data_order_is_deterministic_sharded_and_resumable():

    cfg = load_config(TINY)
    tok = byte_tokenizer()
    ranks = [build_dataset(cfg.data, tok, batch_size=2, rank=r, world_size=2, seed=0) for r in (0, 1)]
    seen = [[ranks[r].next_batch()["sample_ids"] for _ in range(5)] for r in (0, 1)]
    flat = [i for r in seen for b in r for i in b]
    assert len(set(flat)) == len(flat)  # the two ranks never share a window within an epoch
    resumed = build_dataset(cfg.data, tok, batch_size=2, rank=1, world_size=2, seed=0)
    resumed.load_state_dict({"kind": "packed", "position": 3, "n_windows": len(resumed)})
    assert [resumed.next_batch()["sample_ids"] for _ in range(2)] == seen[1][3:5]
    batch = resumed.next_batch()
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, cfg.data.seq_len)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(19) > 0.1 and abs(f(20) - 0.1) < 1e-12 and all(f(s) >= f(s + 1) for s in range(4, 20))


def _fake_checkpoint(root: Path, name: str, files: dict[str, bytes], manifest: bool = True, lie: bool = False):
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    for rel, content in files.items():
        (d / rel).write_bytes(content)
    if manifest:
        sizes = {rel: len(c) + (1 if lie else 0) for rel, c in files.items()}
        (d / "state.json").write_text(json.dumps({"step": int(name.split("-")[-1]), "files": sizes}))
    return d


def test_partial_checkpoints_are_ignored_with_a_warning(tmp_path):
    good = _fake_checkpoint(tmp_path, "step-00000002", {"model.safetensors": b"x" * 10})
    _fake_checkpoint(tmp_path, ".tmp-step-00000004", {"model.safetensors": b"x" * 3}, manifest=False)
    _fake_checkpoint(tmp_path, "step-00000006", {"model.safetensors": b"x" * 3}, lie=True)  # truncated file
    _fake_checkpoint(tmp_path, "step-00000008", {"model.safetensors": b"x" * 10}, manifest=False)  # no state.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(tmp_path) == good
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 3, messages
    assert any(".tmp-step-00000004" in m for m in messages) and any("expected 4" in m for m in messages)
    assert complete_checkpoints(tmp_path, warn=False) == [good]
    assert RunConfig().resume == "no"


def test_streaming_data_is_deterministic_and_resumable(tmp_path):

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * (i % 7 + 3)}) + "\n" for i in range(60)))
    cfg = load_config(TINY, [f"data.path={docs}", "data.streaming=true", "data.shuffle_buffer=16", "data.seq_len=16"])
    validate(cfg)
    tok = byte_tokenizer()

    def make(rank):
        return build_dataset(cfg.data, tok, batch_size=2, rank=rank, world_size=2, seed=0)

    first = make(0)
    batches = [first.next_batch() for _ in range(4)]
    again = make(0)
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(batches, [again.next_batch() for _ in range(4)]))
    other = make(1).next_batch()
    assert not other["input_ids"].equal(batches[0]["input_ids"])  # the other process reads other documents
    resumed = make(0)
    resumed.load_state_dict(first.state_dict() | {"position": 2})
    assert resumed.next_batch()["input_ids"].equal(batches[2]["input_ids"])


def test_thought_settings_are_the_model_configs_fields_and_defaults():
    model_defaults = {f.name: f.default for f in dataclasses.fields(QuietStarConfig)}
    run_defaults = {f.name: f.default for f in dataclasses.fields(ThoughtConfig) if not f.metadata.get("run_only")}
    assert run_defaults.keys() <= model_defaults.keys()
    assert [f.name for f in dataclasses.fields(ThoughtConfig) if f.metadata.get("run_only")] == ["schedule"]
    # The official training recipe (docs/ALGORITHM.md, "Names"), in both places.
    paper = dict(n_thought_tokens=9, n_talk_tokens=4, n_passes=2, thought_temperature=1.0, reinforce_temperature=3.0,
                 base_loss_weight=0.5, talk_loss_weight=0.5, policy_loss_weight=1e6, clip_negative_advantages=True,
                 mixing_head_activation="none", embedding_scale=100.0)
    assert run_defaults == paper | {"thought_forward": "replay"}  # + how the step is scheduled (same values)
    assert {name: model_defaults[name] for name in run_defaults} == run_defaults


def test_thought_settings_are_validated_by_the_model_config():
    cfg = load_config(TINY, ["thought.n_thought_tokens=0"])
    with pytest.raises(ConfigError, match="n_thought_tokens must be >= 1"):
        validate(cfg)


def test_sequence_too_long_for_the_model_fails_before_any_data(tmp_path):
    """The model's own length check (positions + thought steps) at config time, as a ConfigError."""
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", "data.seq_len=2047", "logging.progress_bar=false"])
    with pytest.raises(ConfigError, match=r"data.seq_len 2047: sequence too long.*use at most 2042 tokens"):
        train(cfg)


def test_runtime_thought_fields_are_the_ones_that_change_no_weights():
    fields = runtime_thought_fields()
    assert "mixing_head_activation" not in fields and "embedding_scale" not in fields
    assert {"n_thought_tokens", "thought_temperature", "policy_loss_weight", "n_passes"} <= set(fields)


def test_a_saved_quietstar_folder_keeps_its_weight_settings_and_takes_the_runtime_ones(tmp_path):
    """model.path = a saved Quiet-STaR folder: the run config's defaults for the settings its weights
    depend on (embedding_scale 100) do not clash with the saved ones; the runtime ones apply."""
    from quietstar import QuietStarForCausalLM
    from quietstar.assets import tiny_random_llama
    from quietstar.training.models import build_model

    tok = byte_tokenizer()
    saved = QuietStarForCausalLM.from_base(tiny_random_llama(len(tok), seed=0), tokenizer=tok, embedding_scale=10.0,
                                           n_thought_tokens=2)
    saved.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    cfg = load_config(TINY, [f"model.path={tmp_path / 'saved'}", "thought.n_thought_tokens=5"])
    assert cfg.thought.embedding_scale == 100.0
    model, _ = build_model(cfg.model, cfg.thought)
    assert model.config.embedding_scale == 10.0 and model.config.n_thought_tokens == 5
