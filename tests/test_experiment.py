"""quietstar-experiment end to end on the tiny recipe: every arm and student trained, scored on the same
tokens, tabulated, plotted, merged; the config's refusals."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "train" / "experiments" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny recipe (every arm and student, CHAMP as the other style) run once through the CLI."""
    pytest.importorskip("champ_dataset")
    out = tmp_path_factory.mktemp("exp") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "quietstar.experiment.runner", "--config", TINY, "--set", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_arm_and_student_trains_and_is_scored_on_the_same_tokens(tiny_run):
    out, results = tiny_run
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == {"thinking", "curriculum", "control", "ntp_policy_from_thinking", "distill_from_thinking",
                         "ntp_policy_from_curriculum", "distill_from_curriculum"}
    assert all(r["seed"] == 0 for r in results["runs"])
    # The curve starts at the model as each run begins (step 0) and follows heldout.every = 2.
    assert all([c["step"] for c in r["curve"]] == [0, 2, 4] for r in results["runs"])
    assert runs["thinking"]["curve"][0]["nll_base"] == pytest.approx(runs["control"]["curve"][0]["nll_base"], abs=1e-4)
    assert "policy_loss" in runs["thinking"]["history"][-1] and "policy_loss" not in runs["control"]["history"][-1]
    assert "kl" in runs["distill_from_thinking"]["history"][-1]
    # The curriculum thought with N 3 for steps 0-1, then 2 (the schedule counts steps from 0).
    assert [h["n_thought_tokens"] for h in runs["curriculum"]["history"]] == [3, 3, 2, 2]
    # Each student learned from its own teacher's export, which was then removed (students.keep_teachers false).
    import yaml

    for kind in ("ntp_policy", "distill"):
        for teacher in ("thinking", "curriculum"):
            stage = yaml.safe_load((out / f"{kind}_from_{teacher}_seed0" / "config.yaml").read_text())["stage"]
            assert stage["kind"] == kind and Path(stage["teacher"]) == out / f"{teacher}_seed0" / "final"
    assert not (out / "thinking_seed0" / "final").exists() and not (out / "curriculum_seed0" / "final").exists()
    base = results["base"]["rows"]["untouched base"]["per_token"]
    assert set(base) == {"generated", "other_style"} and all(len(v) > 10 for v in base.values())
    for run in results["runs"]:
        for label, row in run["rows"].items():
            assert {t: len(v) for t, v in row["per_token"].items()} == {t: len(v) for t, v in base.items()}, label


def test_rows_report_their_inference_cost(tiny_run):
    _, results = tiny_run
    summary = results["summary"]
    n = results["config"]["run"]["thought"]["n_thought_tokens"]  # 2; the curriculum's last stage is 2 too
    for label, row in summary.items():
        steps = row["forward_steps"]["mean"]
        if label.endswith(", thinking"):
            assert steps == n + 3, label  # sot, N thought tokens, eot, the emitted token
        else:
            assert steps == 1.0, label  # base predictions, control and students: the base model's cost
        assert row["seconds_per_token"]["mean"] > 0


def test_the_table_and_plots_show_every_row_against_the_untouched_base(tiny_run):
    out, results = tiny_run
    summary = results["summary"]
    assert list(summary) == ["untouched base", "Quiet-STaR, base prediction", "Quiet-STaR, thinking",
                             "Quiet-STaR+curriculum, base prediction", "Quiet-STaR+curriculum, thinking", "control (plain LM)",
                             "NTP (Fast Quiet-STaR) from Quiet-STaR", "distilled from Quiet-STaR",
                             "NTP (Fast Quiet-STaR) from Quiet-STaR+curriculum", "distilled from Quiet-STaR+curriculum"]
    untouched = summary["untouched base"]["texts"]["generated"]
    assert untouched["delta_nll"]["mean"] == 0.0 and len(untouched["deciles"]) == 10
    table = (out / "results.md").read_text()
    assert "| NTP (Fast Quiet-STaR) from Quiet-STaR | 1 | 1.0 |" in table and "other_style: NLL" in table
    assert table.count("by decile of the untouched base") == 2  # one decile table per held-out text
    for name in ("curves.png", "deciles.png", "decile_deltas.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_seeds_run_apart_merge_into_one_table_and_a_repeat_is_refused(tiny_run, tmp_path):
    from quietstar.experiment.runner import main, merge_results
    from quietstar.training.config import ConfigError

    out, results = tiny_run
    other = copy.deepcopy(results)
    other["config"]["training_seeds"] = [1]
    for run in other["runs"]:
        run["seed"] = 1
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "results.json").write_text(json.dumps(other))
    main(["--merge", str(out), str(tmp_path / "s1"), "--output-dir", str(tmp_path / "all")])
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert merged["config"]["training_seeds"] == [0, 1] and len(merged["runs"]) == 2 * len(results["runs"])
    assert merged["summary"]["distilled from Quiet-STaR"]["seeds"] == 2
    assert (tmp_path / "all" / "decile_deltas.png").is_file()
    with pytest.raises(ConfigError, match="no results.json in"):
        merge_results([str(out), str(tmp_path / "none")])
    with pytest.raises(ConfigError, match="repeats thinking seed 0"):
        merge_results([str(out), str(out)])
    other["config"]["run"]["optim"]["lr"] = 0.5
    (tmp_path / "s1" / "results.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="ran another config"):
        merge_results([str(out), str(tmp_path / "s1")])


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_recipe_loads_and_its_runs_validate(path, tmp_path):
    from quietstar.experiment.config import enabled_arms
    from quietstar.experiment.runner import arm_config, load_experiment_config, student_config
    from quietstar.training.config_checks import validate

    cfg = load_experiment_config(str(path))
    assert cfg.training_seeds and enabled_arms(cfg)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text('{"text": "1 + 1 = 2"}\n')
    for arm in enabled_arms(cfg):
        validate(arm_config(cfg, arm, 0, train_file))
    for teacher in cfg.students.teachers if cfg.students.kinds else []:
        for kind in cfg.students.kinds:
            run = student_config(cfg, kind, teacher, "runs/teacher/final", 0, train_file)
            assert run.stage.kind == kind and run.stage.teacher == "runs/teacher/final"


def test_bad_experiment_config_is_refused_clearly():
    from quietstar.experiment.runner import load_experiment_config
    from quietstar.training.config import ConfigError

    with pytest.raises(ConfigError, match="at least one seed"):
        load_experiment_config(TINY, ["training_seeds=[]"])
    with pytest.raises(ConfigError, match="unknown config key 'heldout.evry'.*every"):
        load_experiment_config(TINY, ["heldout.evry=3"])
    with pytest.raises(ConfigError, match="arms.curriculum needs a thought-length schedule"):
        load_experiment_config(TINY, ["arms.curriculum.overrides=[]"])
    with pytest.raises(ConfigError, match="arms.thinking has a thought.schedule"):
        load_experiment_config(TINY, ['arms.thinking.overrides=["thought.schedule={stages: [{from_step: 0, n_thought_tokens: 2}]}"]'])
    with pytest.raises(ConfigError, match="arms.control.overrides: unknown config key 'optim.lrr'"):
        load_experiment_config(TINY, ['arms.control.overrides=["optim.lrr=1"]'])
    with pytest.raises(ConfigError, match="arms.curriculum is disabled"):
        load_experiment_config(TINY, ["arms.curriculum.enabled=false"])
    with pytest.raises(ConfigError, match="unknown \\['ntp'\\]"):
        load_experiment_config(TINY, ["students.kinds=[ntp]"])
    with pytest.raises(ConfigError, match="'control' is neither a thinking arm"):
        load_experiment_config(TINY, ["students.teachers=[control]"])
    with pytest.raises(ConfigError, match="students.overrides: .*unknown config key 'stage.kl_weigth'"):
        load_experiment_config(TINY, ['students.overrides=["stage.kl_weigth=2"]'])
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment_config("train/experiments/nope.yaml")
    cfg = load_experiment_config(TINY, ["run.thought.policy_loss_weight=2.5", "heldout.every=3"])
    assert cfg.run.thought.policy_loss_weight == 2.5 and cfg.heldout.every == 3


def test_students_can_learn_from_a_teacher_folder_trained_elsewhere(tmp_path):
    from quietstar.experiment.runner import load_experiment_config, run_experiment
    from quietstar.loading import load_model
    from quietstar.training.config import ConfigError

    teacher, tokenizer = load_model("tiny-random-llama", thought={"n_thought_tokens": 2, "n_talk_tokens": 2})
    folder = tmp_path / "elsewhere" / "final"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    only_students = ["arms.thinking.enabled=false", "arms.control.enabled=false", "arms.curriculum.enabled=false",
                     "students.kinds=[distill]", "heldout.other_style=null", "metric_limit=0", "heldout.every=0",
                     "run.optim.steps=2", f"output_dir={tmp_path / 'exp'}"]
    with pytest.raises(ConfigError, match="neither a thinking arm .* nor a saved Quiet-STaR folder"):
        load_experiment_config(TINY, [*only_students[1:], f"students.teachers=[{tmp_path}]"])
    with pytest.raises(ConfigError, match="every arm is disabled"):
        load_experiment_config(TINY, [*only_students, f"students.teachers=[{tmp_path}]"])
    results = run_experiment(load_experiment_config(TINY, [*only_students, f"students.teachers=[{folder}]"]))
    assert [(r["arm"], list(r["rows"])) for r in results["runs"]] == [("distill_from_elsewhere_final",
                                                                       ["distilled from elsewhere/final"])]
    assert (folder / "config.json").is_file()  # a teacher given as a folder is never removed
