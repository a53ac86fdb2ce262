"""quietstar-experiment end to end on the tiny recipe: both arms trained, scored, tabulated and plotted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_experiment_runs_end_to_end_and_writes_tables_and_plots(tmp_path):
    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "-m", "quietstar.experiment.runner", "--config",
                           str(ROOT / "train" / "experiments" / "tiny.yaml"), "--set", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    arms = {(a["arm"], a["seed"]) for a in results["arms"]}
    assert arms == {("thinking", 0), ("control", 0)}
    thinking = next(a for a in results["arms"] if a["arm"] == "thinking")
    control = next(a for a in results["arms"] if a["arm"] == "control")
    assert [c["step"] for c in thinking["curve"]] == [0, 2, 4] == [c["step"] for c in control["curve"]]
    assert thinking["curve"][0] == control["curve"][0]  # step 0: the untouched model, the same for both arms
    assert "policy_loss" in thinking["history"][-1] and "policy_loss" not in control["history"][-1]
    # Both arms were scored on the same held-out tokens as the untouched base.
    n = results["base"]["report"]["n_tokens"]
    assert thinking["final"]["report"]["n_tokens"] == control["final"]["report"]["n_tokens"] == n > 0
    summary = results["summary"]
    assert set(summary) == {"untouched base", "control (plain LM)", "Quiet-STaR, base prediction", "Quiet-STaR, thinking"}
    assert len(summary["untouched base"]["deciles"]) == 10
    table = (out / "results.md").read_text()
    assert "| untouched base |" in table and "hardest 10%" in table
    for name in ("curves.png", "deciles.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        image = pytest.importorskip("matplotlib.image").imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_recipe_loads_and_its_run_validates(path):
    from quietstar.experiment.runner import load_experiment_config
    from quietstar.training.config_checks import validate

    cfg = load_experiment_config(str(path))
    validate(cfg.run)
    assert cfg.training_seeds and cfg.run.thinking


def test_bad_experiment_config_is_refused_clearly(tmp_path):
    from quietstar.experiment.runner import load_experiment_config
    from quietstar.training.config import ConfigError

    tiny = str(ROOT / "train" / "experiments" / "tiny.yaml")
    with pytest.raises(ConfigError, match="at least one seed"):
        load_experiment_config(tiny, ["training_seeds=[]"])
    with pytest.raises(ConfigError, match="unknown config key 'heldout.evry'.*every"):
        load_experiment_config(tiny, ["heldout.evry=3"])
    cfg = load_experiment_config(tiny, ["run.thought.policy_loss_weight=2.5", "heldout.every=3"])
    assert cfg.run.thought.policy_loss_weight == 2.5 and cfg.heldout.every == 3
