"""The README's default run (SmolLM2-135M on the bundled corpus), end to end at smaller sizes."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_recipe_trains_and_exports(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "default"
    sets = [f"output_dir={out}", "optim.steps=1", "data.seq_len=16", "thought.n_thought_tokens=2",
            "checkpoint.every=1", "logging.trackers=[tensorboard]", "logging.thoughts_every=1", "logging.progress_bar=false"]
    cmd = [sys.executable, "-m", "quietstar.training.cli", "--config", str(ROOT / "train/configs/cpu_default.yaml")]
    cmd += sum((["--set", s] for s in sets), [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in proc.stdout.splitlines() if line.startswith("step ") and " loss " in line]
    assert len(losses) == 1 and all(math.isfinite(x) for x in losses)
    assert "<|startthought|>" in proc.stdout  # decoded thoughts are printed
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "checkpoints" / "step-00000001" / "state.json").is_file()

    import quietstar  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "QuietStarForCausalLM" and model.config.n_thought_tokens == 2
