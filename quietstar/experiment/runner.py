"""``quietstar-experiment``: does thinking make the model predict better, and what survives without thoughts?

    quietstar-experiment --config train/experiments/smollm2.yaml
    quietstar-experiment --config train/experiments/smollm2_ntp.yaml          # every variant, 3 seeds
    quietstar-experiment --config train/experiments/tiny.yaml --set run.optim.steps=4
    quietstar-experiment --merge runs/a runs/b --output-dir runs/ab          # seeds run apart, one table
    quietstar-experiment --report runs/ab                                    # tables and plots again

For every training seed, on the same generated math text, with the same data order: the enabled
arms (``arms``: Quiet-STaR; the plain-LM control; Quiet-STaR with a thought-length curriculum), each
the shared ``run`` section changed by its overrides; then, from each thinking arm named in
``students.teachers``, a thought-free student per ``students.kinds`` (Fast Quiet-STaR's NTP stage,
``ntp_policy``, and the distillation baseline, ``distill``), trained on the same data from the arm's
export. Every model is scored during training (held-out curves) and at the end: held-out NLL per
token on the corpus's held-out problems and on math text in another style
(``heldout.other_style``), the paper's GSM8K metric, and the inference cost per emitted token;
the untouched base is scored once. ``results.json`` is written after every run (a long experiment
keeps what it finished); ``results.md``, ``curves.png``, ``deciles.png`` and ``decile_deltas.png``
at the end (``summary.py``, ``plots.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from ..evaluation.data import load_examples
from ..training.config import ConfigError, RunConfig
from ..training.config_loading import to_dict
from .config import ExperimentConfig, arm_run, check_experiment, enabled_arms, load_experiment_config
from .corpus import prepare_corpus
from .other_style import other_style_text
from .scoring import BASE, THINKING, curve_point, score_model
from .summary import UNTOUCHED, results_markdown, summarise

__all__ = ["ExperimentConfig", "load_experiment_config", "run_experiment", "main"]

ARM_LABELS = {"thinking": "Quiet-STaR", "curriculum": "Quiet-STaR+curriculum", "control": "control (plain LM)"}
STUDENT_LABELS = {"ntp_policy": "NTP (Fast Quiet-STaR)", "distill": "distilled"}


def row_labels(arm: str, rows: dict) -> dict:
    """``score_model``'s rows under their table labels."""
    if arm == "control":
        return {ARM_LABELS[arm]: rows[BASE]}
    return {f"{ARM_LABELS[arm]}, {name}": row for name, row in rows.items()}


def teacher_name(teacher: str) -> str:
    """A thinking arm's label, or a teacher folder's own name (``runs/x/final`` -> ``x/final``)."""
    return ARM_LABELS.get(teacher) or "/".join(Path(teacher).parts[-2:])


def student_label(kind: str, teacher: str) -> str:
    return f"{STUDENT_LABELS[kind]} from {teacher_name(teacher)}"


def student_arm(kind: str, teacher: str) -> str:
    """The student's run name (its output folder's stem)."""
    return f"{kind}_from_{teacher if teacher in ARM_LABELS else teacher_name(teacher).replace('/', '_')}"


def _finish_run(run: RunConfig, name: str, seed: int, cfg: ExperimentConfig, train_file: Path, export: bool) -> RunConfig:
    """The fields every run of the experiment gets, whatever its overrides say."""
    run.seed = seed
    run.name, run.output_dir = f"{cfg.name}-{name}-seed{seed}", str(Path(cfg.output_dir) / f"{name}_seed{seed}")
    run.data.path, run.resume = str(train_file), "no"
    run.data.text_field, run.data.streaming, run.data.max_documents = "text", False, None  # the corpus file as written
    run.checkpoint.every, run.checkpoint.export = 0, export  # scored in memory; teachers exported for their students
    run.logging.trackers = []
    return run


def arm_config(cfg: ExperimentConfig, arm: str, seed: int, train_file: Path, export: bool = False) -> RunConfig:
    run = arm_run(cfg, getattr(cfg.arms, arm).overrides, where=f"arms.{arm}.overrides")
    run.thinking = arm != "control"
    return _finish_run(run, arm, seed, cfg, train_file, export)


def student_config(cfg: ExperimentConfig, kind: str, teacher: str, teacher_dir: str, seed: int, train_file: Path) -> RunConfig:
    run = arm_run(cfg, cfg.students.overrides, stage={"kind": kind, "teacher": teacher_dir}, where="students.overrides")
    return _finish_run(run, student_arm(kind, teacher), seed, cfg, train_file, export=False)


def train_and_score(run: RunConfig, cfg: ExperimentConfig, texts: dict, tokenizer, examples, thinking: bool) -> dict:
    """Train ``run``, scoring the held-out curve (step 0 = the model as the run starts) and, after the
    last step, the model's rows; returns history, curve, rows, timings and the export folder."""
    from ..training.loop import train
    from ..training.sharding import is_fully_sharded

    total, curve, rows, scoring_s = run.optim.steps, [], {}, [0.0]

    def point(step, model):
        t0 = time.perf_counter()
        curve.append(curve_point(step, model, tokenizer, texts["generated"], cfg.heldout, thinking))
        scoring_s[0] += time.perf_counter() - t0

    def before_step(step, model):
        if step == 1:
            point(0, model)

    def on_step(report):
        if not report.is_main_process:  # held-out scoring runs on one process, with the whole model
            return
        if is_fully_sharded(report.model):  # its forward would wait for the other processes' shards
            raise ConfigError("periodic held-out evaluation needs the whole model on one process; run experiments without FSDP")
        step = report.step
        if (cfg.heldout.every and step % cfg.heldout.every == 0) or step == total:
            point(step, report.model)
        if step == total:
            t0 = time.perf_counter()
            rows.update(score_model(report.model, tokenizer, texts, cfg, examples, thinking=thinking))
            scoring_s[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = train(run, on_step=on_step, before_step=before_step)
    return {"history": summary["history"], "curve": curve, "rows": rows, "export_dir": summary["export_dir"],
            "wall_s": time.perf_counter() - t0, "scoring_s": scoring_s[0]}


def _write(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(out / "results.json")  # atomic: a crash mid-write keeps the previous file


def run_seed(cfg: ExperimentConfig, seed: int, train_file: Path, texts: dict, tokenizer, examples, record) -> None:
    """Every arm, then every student, of one training seed; ``record(run_result)`` after each."""
    teachers = set(cfg.students.teachers) if cfg.students.kinds else set()
    exports = {}
    for arm in enabled_arms(cfg):
        print(f"== {arm}, seed {seed}", flush=True)
        run = arm_config(cfg, arm, seed, train_file, export=arm in teachers)
        result = train_and_score(run, cfg, texts, tokenizer, examples, thinking=arm != "control")
        exports[arm] = result.pop("export_dir")
        record({"arm": arm, "seed": seed, **result, "rows": row_labels(arm, result["rows"])})
    for teacher in cfg.students.teachers if cfg.students.kinds else []:
        for kind in cfg.students.kinds:
            print(f"== {kind} student of {teacher}, seed {seed}", flush=True)
            run = student_config(cfg, kind, teacher, exports.get(teacher, teacher), seed, train_file)  # arm or folder
            result = train_and_score(run, cfg, texts, tokenizer, examples, thinking=False)
            result.pop("export_dir")
            record({"arm": student_arm(kind, teacher), "seed": seed, **result,
                    "rows": {student_label(kind, teacher): result["rows"][BASE]}})
        if teacher in exports and not cfg.students.keep_teachers:  # this run's export; a given folder stays
            shutil.rmtree(exports[teacher], ignore_errors=True)


def run_experiment(cfg: ExperimentConfig) -> dict:
    from ..training.models import build_model

    check_experiment(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    paths = prepare_corpus(cfg.corpus, out / "data")
    texts = {"generated": paths["heldout"].read_text(encoding="utf-8")}
    if cfg.heldout.other_style:
        texts["other_style"] = other_style_text(cfg.heldout.other_style)
    examples = []
    if cfg.metric_limit:
        source = str(paths["heldout_gsm8k"]) if cfg.metric_source == "corpus" else cfg.metric_source
        examples = load_examples("gsm8k", source, limit=cfg.metric_limit)

    t0 = time.perf_counter()
    if cfg.run.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.run.cpu_threads)
    base_model, tokenizer = build_model(cfg.run.model, cfg.run.thought, seed=cfg.run.seed)
    rows = score_model(base_model.base_lm, tokenizer, texts, cfg, examples, thinking=False)
    results = {"config": to_dict(cfg), "base": {"rows": {UNTOUCHED: rows[BASE]}}, "runs": []}
    del base_model

    def record(run_result: dict) -> None:
        results["runs"].append(run_result)
        results["wall_s"] = time.perf_counter() - t0
        _write(results, out)

    for seed in cfg.training_seeds:
        run_seed(cfg, seed, paths["train"], texts, tokenizer, examples, record)
    results["wall_s"] = time.perf_counter() - t0
    return write_report(results, out)


def write_report(results: dict, out: Path) -> dict:
    """Summary, ``results.json``, ``results.md`` and the plots of ``results`` into ``out``."""
    from .plots import plot_curves, plot_decile_deltas, plot_deciles

    out.mkdir(parents=True, exist_ok=True)
    results["summary"] = summarise(results)
    _write(results, out)
    (out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    plot_curves(results, out / "curves.png")
    plot_deciles(results, out / "deciles.png")
    plot_decile_deltas(results, out / "decile_deltas.png")
    return results


def merge_results(dirs: list[str]) -> dict:
    """One ``results`` from experiments that ran different seeds of the same config (e.g. in parallel)."""
    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise ConfigError(f"no results.json in {missing}: an experiment writes it once its first run is scored")
    parts = [json.loads((Path(d) / "results.json").read_text(encoding="utf-8")) for d in dirs]
    first = parts[0]

    def comparable(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("training_seeds", "output_dir", "name")}

    for d, part in zip(dirs[1:], parts[1:]):
        if comparable(part["config"]) != comparable(first["config"]):
            raise ConfigError(f"{d} ran another config than {dirs[0]} (beyond training_seeds, output_dir, name): not merged")
    seen = set()
    for d, part in zip(dirs, parts):
        for run in part["runs"]:
            if (run["arm"], run["seed"]) in seen:
                raise ConfigError(f"{d} repeats {run['arm']} seed {run['seed']}: merge experiments of different seeds")
            seen.add((run["arm"], run["seed"]))
    config = {**first["config"], "training_seeds": sorted({s for p in parts for s in p["config"]["training_seeds"]})}
    return {"config": config, "base": first["base"], "runs": [run for p in parts for run in p["runs"]],
            "wall_s": sum(p.get("wall_s", 0.0) for p in parts), "merged_from": [str(d) for d in dirs]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="quietstar-experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (train/experiments/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. run.optim.steps=50")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge the results.json of experiments run with different seeds")
    p.add_argument("--report", metavar="DIR", help="write the tables and plots of DIR/results.json again")
    p.add_argument("--output-dir", help="where --merge writes (default: the first DIR's parent / merged)")
    args = p.parse_args(argv)
    try:
        if args.merge:
            out = Path(args.output_dir or Path(args.merge[0]).parent / "merged")
            results = write_report(merge_results(args.merge), out)
        elif args.report:
            out = Path(args.report)
            results = write_report(json.loads((out / "results.json").read_text(encoding="utf-8")), out)
        elif args.config:
            cfg = load_experiment_config(args.config, args.set)
            out = Path(cfg.output_dir)
            results = run_experiment(cfg)
        else:
            p.error("give --config (run an experiment), --merge DIR... or --report DIR")
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"quietstar-experiment: {err}")
    print(results_markdown(results))
    print(f"wrote {out / 'results.md'}, results.json, curves.png, deciles.png, decile_deltas.png")


if __name__ == "__main__":
    main()
