"""Training runs of the tiny model in subprocesses, shared by the FSDP2 and world-size resume tests.

Each named run is launched once per test session (they cost seconds each on two cores) and its
output folder handed to every test that reads it. Every launch runs ``tests/trace_run.py`` (the
command with a per-step trace of every process) in place of ``quietstar.training.cli``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"
FSDP_CPU = ROOT / "train" / "accelerate" / "fsdp2_cpu_2proc.yaml"
STEPS = 8  # a step costs a fraction of a second, a launch ~10 s: the kill test gets 6 steps of margin
# policy_loss_weight 1 instead of the paper's 1e6: at initialisation the rewards are ~1e-6, so the
# 1e6 weight turns reduction-order rounding (~1e-7) into ~1% differences in the gradient by step 2,
# and a DDP-vs-FSDP2 comparison would measure that amplification, not the sharding.
COMMON = [f"optim.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=0", "thought.policy_loss_weight=1.0",
          "logging.thoughts_every=0"]

TRACED = "tests.trace_run"  # quietstar-train whose every process writes a per-step trace
LAUNCH = {
    # quietstar-train checks the accelerate config, then re-launches under `accelerate launch`.
    "fsdp2": [sys.executable, "-m", TRACED, "--accelerate-config", str(FSDP_CPU)],
    "fsdp1": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), "--num_processes", "1",
              "--main_process_port", "0",
              "--module", TRACED],
    "ddp2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", TRACED],
    "ddp1": [sys.executable, "-m", TRACED],
}

_finished: dict[str, Path] = {}


def env(out: Path | None = None) -> dict:
    """The subprocesses' environment; with ``out``, their trace goes to ``<out>-trace.rank<R>.jsonl``."""
    extra = {"QUIETSTAR_TRACE": f"{out}-trace"} if out is not None else {}
    out = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    out.pop("TRITON_INTERPRET", None)
    return out


def command(launch: str, out: Path, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", "logging.progress_bar=false", *COMMON, *extra]
    return [*LAUNCH[launch], "--config", str(TINY), *sum((["--set", s] for s in sets), [])]


def run(launch: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(launch, out, *extra), env=env(out), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def run_once(name: str, tmp_path_factory, launch: str, *extra: str) -> Path:
    """Output folder of run ``name``, launched on first use in this session."""
    if name not in _finished:
        out = tmp_path_factory.mktemp("runs") / name
        proc = run(launch, out, *extra)
        (out.parent / f"{name}.stdout").write_text(proc.stdout)
        (out.parent / f"{name}.stderr").write_text(proc.stderr)
        _finished[name] = out
    return _finished[name]


def trace(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in Path(f"{out}-trace.rank{rank}.jsonl").read_text().splitlines()]


def stdout(out: Path) -> str:
    return (out.parent / f"{out.name}.stdout").read_text()
