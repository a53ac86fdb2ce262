"""quietstar-train with a thought-length curriculum (``thought.schedule``) and with a ``stage`` section
(a plain student trained toward a frozen thinking teacher), end to end on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quietstar.training.config import ConfigError
from quietstar.training.config_loading import load_config
from quietstar.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"
SCHEDULE = "thought.schedule={stages: [{from_step: 0, n_thought_tokens: 3}, {from_step: 2, n_thought_tokens: 2}, {from_step: 4, n_thought_tokens: 1}]}"


def _cfg(out, *extra):
    return load_config(TINY, [f"output_dir={out}", "logging.progress_bar=false", "logging.thoughts_every=0",
                              "optim.steps=5", "checkpoint.every=2", "checkpoint.keep=0", *extra])


def _n_per_step(summary):
    return [(h["step"], h["n_thought_tokens"]) for h in summary["history"]]


def test_a_schedule_sets_n_per_step_is_logged_exported_and_resumed(tmp_path):
    seen = []
    full = train(_cfg(tmp_path / "full", SCHEDULE),
                 before_step=lambda step, model: seen.append((step, model.config.n_thought_tokens)))
    # steps 1-2 (0-based 0-1) N 3, steps 3-4 N 2, step 5 N 1: set before the user's hook, logged from the thoughts used
    assert _n_per_step(full) == [(1, 3.0), (2, 3.0), (3, 2.0), (4, 2.0), (5, 1.0)]
    assert seen == [(1, 3), (2, 3), (3, 2), (4, 2), (5, 1)]
    exported = json.loads((tmp_path / "full" / "final" / "config.json").read_text())
    assert exported["n_thought_tokens"] == 1  # the last stage's length
    # Resumed from step 2 in a new folder: the steps after it think with the schedule's N, and the
    # weights end where the uninterrupted run's did (same code path, same machine: bit-identical).
    resumed = train(_cfg(tmp_path / "resumed", SCHEDULE, f"resume={tmp_path / 'full' / 'checkpoints' / 'step-00000002'}"))
    assert _n_per_step(resumed) == [(3, 2.0), (4, 2.0), (5, 1.0)]
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, message", [
    ("thought.schedule={stages: [{from_step: 1, n_thought_tokens: 3}]}", r"stages\[0\].from_step must be 0"),
    ("thought.schedule={stages: [{from_step: 0, n_thought_tokens: 2}, {from_step: 3, n_thought_tokens: 4}]}",
     "allow_increase: true"),
    ("thought.schedule={stages: [{from_step: 0, n_thoughts: 2}]}", r"unknown config key 'thought.schedule.stages\[0\].n_thoughts'"),
])
def test_a_bad_schedule_is_refused_before_anything_loads(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(tmp_path, bad))


@pytest.mark.parametrize("kind", ["distill", "ntp_policy"])
def test_a_stage_trains_a_plain_student_and_exports_it_plain(tmp_path, kind):
    # A teacher whose base moved away from the untouched tiny model, and a student that starts as the
    # untouched model (the paper's choice: the original base, not the teacher's).
    teacher_run = train(_cfg(tmp_path / "teacher", "optim.steps=3", "checkpoint.every=0", "optim.lr=1e-2"))
    teacher = teacher_run["export_dir"]
    stage = f"stage={{kind: {kind}, teacher: {teacher}, student_init: tiny-random-llama}}"
    summary = train(_cfg(tmp_path / "student", stage, "optim.steps=6", "checkpoint.every=0", "optim.lr=3e-3",
                         "optim.warmup_steps=0"))
    kl = [h["kl"] for h in summary["history"]]
    assert all("nll_base" not in h for h in summary["history"]) and len(kl) == 6
    if kind == "distill":
        assert kl[-1] < 0.5 * kl[0]  # the student moves toward the thinking teacher (measured 0.27 -> 0.04)
    else:  # REINFORCE on the student's own tokens, rewarded where it beats the teacher
        assert all(0 <= h["advantage_positive_fraction"] <= 1 and h["policy_loss"] == h["policy_loss"] for h in summary["history"])
    teacher_weights = load_file(str(Path(teacher) / "model.safetensors"))
    assert any("mixing_head" in k for k in teacher_weights)  # the teacher thinks; the student below does not
    check = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'student' / 'final')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'student' / 'final')!r})\n"
        "assert 'quietstar' not in sys.modules, 'the export needs quietstar'\n"
        "assert '<|startthought|>' not in t.get_vocab()\n"
        "print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "LlamaForCausalLM"


def test_a_stage_refuses_what_it_cannot_combine(tmp_path):
    with pytest.raises(ConfigError, match="stage.teacher must name the thinking model"):
        train(_cfg(tmp_path, "stage={kind: distill}"))
    with pytest.raises(ConfigError, match="remove thought.schedule"):
        train(_cfg(tmp_path, "stage={kind: distill, teacher: x}", SCHEDULE))
