"""``quietstar-experiment``: does thinking make the model predict better? Quiet-STaR vs a control.

    quietstar-experiment --config train/experiments/smollm2.yaml
    quietstar-experiment --config train/experiments/tiny.yaml --set run.optim.steps=4

For every training seed, the same base model is trained twice on the same generated math text,
with the same optimiser, learning rates, schedule and data order: (a) with Quiet-STaR, (b) as a plain
causal LM (the control, ``thinking: false``). Every ``heldout.every`` steps both are scored on
held-out problems (:func:`quietstar.evaluation.heldout.heldout_evaluation`); at the end the untouched
base, the control and the Quiet-STaR model (its base prediction and its thinking prediction) are
scored on more held-out text, by decile of the untouched base's per-token NLL, and by the paper's
GSM8K metric on the held-out problems. Writes ``results.json``, ``results.md``, ``curves.png`` and
``deciles.png`` under ``output_dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..evaluation.data import load_examples
from ..evaluation.heldout import by_decile, heldout_evaluation
from ..evaluation.metric import paper_metric
from ..training.config import ConfigError, RunConfig
from ..training.config_loading import apply_overrides, from_dict, to_dict
from .corpus import GENERATED, CorpusConfig, check_corpus, prepare_corpus

__all__ = ["ExperimentConfig", "load_experiment_config", "run_experiment", "main"]


@dataclass
class HeldoutConfig:
    seq_len: int = 64  # tokens per scored window
    batch_size: int = 4
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # thought-sampling seeds, averaged
    every: int = 10  # optimiser steps between evaluations during training (0: only at the end)
    max_windows: int = 8  # windows scored during training (a fixed subset: the curves)
    final_max_windows: int = 32  # windows scored at the end (the tables)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs/experiment"
    training_seeds: list[int] = field(default_factory=lambda: [0])  # each: one Quiet-STaR run and its control
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    metric_limit: int = 50  # held-out problems scored by the paper's GSM8K metric (0: skip)
    # "corpus": the generated corpus's held-out problems; otherwise a load_examples source for GSM8K
    # ("hub": the GSM8K test set, "sample": the bundled sample, or a .jsonl path).
    metric_source: str = "corpus"
    run: RunConfig = field(default_factory=RunConfig)  # the Quiet-STaR run; the control copies it


def load_experiment_config(path: str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    data = apply_overrides(data or {}, overrides or [], root=ExperimentConfig)
    cfg = from_dict(ExperimentConfig, data)
    if cfg.metric_source == "corpus" and cfg.corpus.source != GENERATED and cfg.metric_limit:
        raise ConfigError(f"metric_source 'corpus' needs the generated corpus (its problems have answers), but corpus.source "
                          f"is {cfg.corpus.source!r}; set metric_source to hub (GSM8K's test set), a .jsonl file, or metric_limit=0")
    check_corpus(cfg.corpus)
    if not cfg.training_seeds:
        raise ConfigError("training_seeds is empty: give at least one seed")
    if cfg.heldout.every < 0 or cfg.heldout.max_windows < 1 or cfg.heldout.final_max_windows < 1:
        raise ConfigError("heldout.every must be >= 0 and heldout.max_windows / final_max_windows >= 1")
    return cfg


def _arm_config(cfg: ExperimentConfig, arm: str, seed: int, train_file: Path) -> RunConfig:
    run = copy.deepcopy(cfg.run)
    run.seed, run.thinking = seed, arm == "thinking"
    run.name, run.output_dir = f"{cfg.name}-{arm}-seed{seed}", str(Path(cfg.output_dir) / f"{arm}_seed{seed}")
    run.data.path, run.resume = str(train_file), "no"
    run.data.text_field, run.data.streaming, run.data.max_documents = "text", False, None  # the corpus file as written
    run.checkpoint.every, run.checkpoint.export = 0, False  # the experiment scores the in-memory model
    run.logging.trackers = []
    return run


def _score(model, tokenizer, text: str, cfg: HeldoutConfig, windows: int, thinking: bool):
    return heldout_evaluation(model, tokenizer, text, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seeds=cfg.seeds,
                              max_windows=windows, keep_per_token=True, thinking=thinking)


def _metric(model, tokenizer, examples, use_thoughts: bool) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    torch.manual_seed(0)  # thoughts sampled by the metric: reproducible
    try:
        return paper_metric(model, tokenizer, examples, "gsm8k", use_thoughts=use_thoughts)["score"]
    finally:
        model.train(was_training)


def _curve_point(step: int, r) -> dict:
    return {"step": step, "nll_base": r.nll_base, "nll_thinking": r.nll_thinking, "hard_nll_base": r.hard["nll_base"],
            "hard_nll_thinking": r.hard["nll_thinking"], "reward_mean": r.reward_mean, "mixing_weight_mean": r.mixing_weight["mean"]}


def run_arm(cfg: ExperimentConfig, arm: str, seed: int, train_file: Path, heldout_text: str, tokenizer, examples,
            start: dict | None = None) -> dict:
    """Train one arm (``thinking`` or ``control``) for one seed; score it during and after training.

    ``start``: the untouched model's point on the curve (step 0; a zero-initialised mixing head thinks
    to no effect, so it is the base prediction for both arms)."""
    from ..training.loop import train
    from ..training.sharding import is_fully_sharded

    run = _arm_config(cfg, arm, seed, train_file)
    thinking, total, curve, final = arm == "thinking", run.optim.steps, [start] if start else [], {}

    def on_step(report):
        if not report.is_main_process:  # held-out scoring runs on one process, with the whole model
            return
        if is_fully_sharded(report.model):  # its forward would wait for the other processes' shards
            raise ConfigError("periodic held-out evaluation needs the whole model on one process; run experiments without FSDP")
        step, model = report.step, report.model
        if (cfg.heldout.every and step % cfg.heldout.every == 0) or step == total:
            curve.append(_curve_point(step, _score(model, tokenizer, heldout_text, cfg.heldout, cfg.heldout.max_windows, thinking)))
        if step == total:  # the tables: more windows, the paper's metric
            r = _score(model, tokenizer, heldout_text, cfg.heldout, cfg.heldout.final_max_windows, thinking)
            final.update(report=r.to_dict(per_token=True), metric_base=_metric(model, tokenizer, examples, False),
                         metric_thinking=_metric(model, tokenizer, examples, True) if thinking else None)

    t0 = time.perf_counter()
    summary = train(run, on_step=on_step)
    return {"arm": arm, "seed": seed, "history": summary["history"], "curve": curve, "final": final,
            "wall_s": time.perf_counter() - t0}


def run_experiment(cfg: ExperimentConfig) -> dict:
    from ..training.models import build_model

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    paths = prepare_corpus(cfg.corpus, out / "data")
    heldout_text = paths["heldout"].read_text(encoding="utf-8")
    examples = []
    if cfg.metric_limit:
        source = str(paths["heldout_gsm8k"]) if cfg.metric_source == "corpus" else cfg.metric_source
        examples = load_examples("gsm8k", source, limit=cfg.metric_limit)

    t0 = time.perf_counter()
    if cfg.run.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.run.cpu_threads)
    base_model, tokenizer = build_model(cfg.run.model, cfg.run.thought, seed=cfg.run.seed)
    base = _score(base_model.base_lm, tokenizer, heldout_text, cfg.heldout, cfg.heldout.final_max_windows, thinking=False)
    start = _curve_point(0, _score(base_model.base_lm, tokenizer, heldout_text, cfg.heldout, cfg.heldout.max_windows, thinking=False))
    results = {"config": to_dict(cfg), "base": {"report": base.to_dict(per_token=True),
                                                 "metric_base": _metric(base_model.base_lm, tokenizer, examples, False)},
               "arms": []}
    del base_model
    for seed in cfg.training_seeds:
        for arm in ("thinking", "control"):
            print(f"== {arm}, seed {seed}", flush=True)
            results["arms"].append(run_arm(cfg, arm, seed, paths["train"], heldout_text, tokenizer, examples, start))
    results["summary"] = summarise(results)
    results["wall_s"] = time.perf_counter() - t0

    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    from .plots import plot_curves, plot_deciles

    plot_curves(results, out / "curves.png")
    plot_deciles(results, out / "deciles.png")
    return results


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(results: dict) -> dict:
    """Per row (base, control, Quiet-STaR base and thinking predictions): held-out NLL overall, on the
    hardest 10% of tokens by the untouched base's NLL, by decile, and the metric; mean and spread over seeds."""
    reference = torch.tensor(results["base"]["report"]["per_token"]["base"], dtype=torch.float64)
    rows = {"untouched base": [(results["base"]["report"]["per_token"]["base"], results["base"]["metric_base"])]}
    for arm in results["arms"]:
        report = arm["final"]["report"]
        if arm["arm"] == "control":
            rows.setdefault("control (plain LM)", []).append((report["per_token"]["base"], arm["final"]["metric_base"]))
        else:
            rows.setdefault("Quiet-STaR, base prediction", []).append((report["per_token"]["base"], arm["final"]["metric_base"]))
            rows.setdefault("Quiet-STaR, thinking", []).append((report["per_token"]["thinking"], arm["final"]["metric_thinking"]))
    summary = {}
    for name, runs in rows.items():
        deciles = [by_decile(reference, {"nll": torch.tensor(nll, dtype=torch.float64)}) for nll, _ in runs]
        summary[name] = {
            "nll": _mean_std([statistics.fmean(nll) for nll, _ in runs]),
            "hard_nll": _mean_std([d[-1]["nll"] for d in deciles]),
            "metric": _mean_std([metric for _, metric in runs]),
            "deciles": [_mean_std([d[i]["nll"] for d in deciles]) for i in range(len(deciles[0]))],
            "seeds": len(runs),
        }
    return summary


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["n"] > 1 else "")


def results_markdown(results: dict) -> str:
    cfg, summary = results["config"], results["summary"]
    run = cfg["run"]
    lines = [
        f"# {cfg['name']}",
        "",
        f"Model {run['model']['path']}; N {run['thought']['n_thought_tokens']}, K {run['thought']['n_talk_tokens']}, "
        f"P {run['thought']['n_passes']}, L {run['data']['seq_len']}; {run['optim']['steps']} steps of "
        f"{run['optim']['batch_size']} x {run['optim']['grad_accum']} sequences at lr {run['optim']['lr']}; "
        f"training seeds {cfg['training_seeds']} (mean ± population std over seeds); held-out: "
        f"{results['base']['report']['n_tokens']} tokens, thought seeds {cfg['heldout']['seeds']}; "
        f"wall {results['wall_s']:.0f} s.",
        "",
        "| model | held-out NLL | hardest 10% (by untouched base) | GSM8K-style metric |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {_fmt(s['nll'])} | {_fmt(s['hard_nll'])} | {_fmt(s['metric'])} |" for name, s in summary.items()]
    lines += ["", "Held-out NLL by decile of the untouched base's per-token NLL (10 = hardest):", "",
              "| decile | " + " | ".join(summary) + " |", "|---|" + "---|" * len(summary)]
    n_deciles = len(next(iter(summary.values()))["deciles"])
    for i in range(n_deciles):
        lines.append(f"| {i + 1} | " + " | ".join(_fmt(s["deciles"][i]) for s in summary.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="quietstar-experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (train/experiments/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. run.optim.steps=50")
    args = p.parse_args(argv)
    try:
        cfg = load_experiment_config(args.config, args.set)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"quietstar-experiment: {err}")
    results = run_experiment(cfg)
    print(results_markdown(results))
    print(f"wrote {Path(cfg.output_dir) / 'results.md'}, results.json, curves.png, deciles.png")


if __name__ == "__main__":
    main()
