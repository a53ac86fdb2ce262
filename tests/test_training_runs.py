"""Real training runs of the tiny random model in subprocesses: 2-process DDP (gloo) and kill/resume."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"


def _env(out: Path):
    """The subprocesses' environment; tests/trace_run.py traces every process to ``<out>-trace.rank<R>.jsonl``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", QUIETSTAR_TRACE=f"{out}-trace")
    env.pop("TRITON_INTERPRET", None)
    return env


def _args(out: Path, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", "logging.progress_bar=false", *extra]
    return ["--config", str(TINY), *sum((["--set", s] for s in sets), [])]


def _trace(out: Path, rank: int = 0) -> list[dict]:
    path = Path(f"{out}-trace.rank{rank}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


TRACED = "tests.trace_run"  # quietstar-train whose every process writes a per-step trace
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", TRACED],
    # quietstar-train checks the accelerate config, then re-launches under `accelerate launch`.
    "accelerate": [sys.executable, "-m", TRACED, "--accelerate-config", str(ROOT / "train" / "accelerate" / "cpu_2proc.yaml")],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_data_parallel(tmp_path, launcher):
    out = tmp_path / "ddp"
    cmd = [*LAUNCHERS[launcher], *_args(out, "optim.steps=3", "checkpoint.every=3")]
    proc = subprocess.run(cmd, env=_env(out), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [_trace(out, r) for r in (0, 1)]
    assert [len(t) for t in ranks] == [3, 3]
    for a, b in zip(*ranks):
        assert a["rank"] == 0 and b["rank"] == 1
        ids_a = {i for micro in a["sample_ids"] for i in micro}
        ids_b = {i for micro in b["sample_ids"] for i in micro}
        assert not ids_a & ids_b, "both processes trained on the same windows: world size 2 is not used"
        assert a["param_hash"] == b["param_hash"], f"parameters differ across ranks after step {a['step']}"
        assert math.isfinite(a["loss"]) and math.isfinite(b["loss"])
        assert math.isfinite(a["metrics"]["loss"]) and a["metrics"]["loss"] == b["metrics"]["loss"]  # reduced across ranks
    # one checkpoint and one export, written by rank 0 only
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    assert proc.stdout.count("saved checkpoint") == 1 and "saved checkpoint" in proc.stdout and "(rank 1)" not in proc.stdout
    assert proc.stdout.count("exported") == 1
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data"]["position"] == 3 * 2  # 3 steps x grad_accum 2

    import quietstar  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "QuietStarForCausalLM" and model.config.n_thought_tokens == 3
    exported = load_file(str(out / "final" / "model.safetensors"))
    saved = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    for key, value in saved.items():
        assert torch.equal(exported[key], value), key


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    steps = ["optim.steps=6", "checkpoint.every=2", "checkpoint.keep=0"]
    cli = [sys.executable, "-m", TRACED]

    full = tmp_path / "full"
    proc = subprocess.run([*cli, *_args(full, *steps)], env=_env(full), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    killed = subprocess.Popen([*cli, *_args(run, *steps)], env=_env(run), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, cwd=ROOT)
    for line in killed.stdout:
        if line.startswith("saved checkpoint"):
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # Debris of a crash mid-write: a never-renamed temporary folder and a folder without its manifest.
    (run / "checkpoints" / ".tmp-step-00000099").mkdir()
    (run / "checkpoints" / "step-00000098").mkdir()
    (run / "checkpoints" / "step-00000098" / "model.safetensors").write_bytes(b"partial")

    resumed = subprocess.run([*cli, *_args(run, *steps), "--resume"], env=_env(run), capture_output=True, text=True,
                             timeout=240, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ignoring partially written checkpoint" in resumed.stderr and "ignoring incomplete checkpoint" in resumed.stderr
    start = int(resumed.stdout.split("at step ")[1].split()[0])
    assert start >= 2 and start % 2 == 0

    reference, interrupted = _trace(full), _trace(run)
    # the killed run's steps up to the checkpoint, then the resumed run's steps
    combined = [t for t in interrupted if t["step"] <= start][:start] + [t for t in interrupted if t["step"] > start][-(6 - start):]
    assert [t["step"] for t in combined] == list(range(1, 7))
    assert [t["sample_ids"] for t in combined] == [t["sample_ids"] for t in reference], "data order changed by the resume"
    assert [t["param_hash"] for t in combined] == [t["param_hash"] for t in reference]
    # Tolerance: none. Same process count and threads on CPU make the resumed run bit-identical.
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# quietstar-train counting the calls, made with grad, of the modules inside each decoder layer: with
# gradient checkpointing each runs again in backward (the recomputation), so the count doubles. The
# layer's own hooks would not show it: transformers >= 5.25 checkpoints its forward, not its __call__.
_COUNTING_CLI = """
import os, sys, torch
from transformers.modeling_layers import GradientCheckpointingLayer
import quietstar.training.models as models
from quietstar.training.cli import main
from tests.trace_run import TRACE_ENV, tracer
calls = 0
def count(module, args):
    global calls
    calls += torch.is_grad_enabled()
build = models.build_model
def build_and_count(*args, **kwargs):
    model, tokenizer = build(*args, **kwargs)
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        for child in layer.children():
            child.register_forward_pre_hook(count)
    return model, tokenizer
models.build_model = build_and_count  # train() imports it at call time
status = main(sys.argv[1:], on_step=tracer(os.environ[TRACE_ENV]))
print(f"decoder sublayer calls with grad: {calls}")
sys.exit(status)
"""


def test_gradient_checkpointing_changes_nothing(tmp_path):
    traces, layer_calls = [], []
    for flag in ("false", "true"):
        out = tmp_path / f"gc-{flag}"
        sets = _args(out, "optim.steps=2", "checkpoint.every=0", "checkpoint.export=false", f"model.gradient_checkpointing={flag}")
        proc = subprocess.run([sys.executable, "-c", _COUNTING_CLI, *sets], env=_env(out), capture_output=True, text=True,
                              timeout=240, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        traces.append(_trace(out))
        layer_calls.append(int(proc.stdout.rsplit("decoder sublayer calls with grad: ", 1)[1].split()[0]))
    # Checkpointing was really on: every call inside a decoder layer with grad was recomputed once in backward.
    assert layer_calls[0] > 0 and layer_calls[1] == 2 * layer_calls[0], layer_calls
    # Recomputation replays the same ops on the same inputs in the same process layout: bit-identical.
    assert [t["param_hash"] for t in traces[0]] == [t["param_hash"] for t in traces[1]]
