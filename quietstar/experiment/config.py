"""The experiment's config: which arms train, how they are scored; ``run`` is the run config they share.

Every arm is the ``run`` section changed by its own ``overrides`` (``--set``-style ``key=value``
strings over the run config), so one file states what the arms have in common and, per arm, what
differs. The students (the thought-free NTP stage) train from the exported thinking arms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..loading import is_saved_quietstar
from ..training.config import ConfigError, RunConfig
from ..training.config_loading import apply_overrides, from_dict, to_dict
from ..training.stage_config import KINDS
from .corpus import GENERATED, CorpusConfig, check_corpus
from .other_style import CHAMP

THINKING_ARMS = ("thinking", "curriculum")


@dataclass
class HeldoutConfig:
    seq_len: int = 64  # tokens per scored window
    batch_size: int = 4
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # thought-sampling seeds, averaged
    every: int = 10  # optimiser steps between evaluations during training (0: only at the end)
    max_windows: int = 8  # windows scored during training (a fixed subset: the curves)
    final_max_windows: int = 32  # windows scored at the end (the tables)
    # Math text in another style than the training corpus, scored at the end too: "champ" (CHAMP's
    # competition problems with human-written solutions, `pip install champ-dataset`), a UTF-8 text
    # file, or null (skip).
    other_style: str | None = CHAMP


@dataclass
class CostConfig:
    """Inference cost per emitted token of every row: greedy generation from a held-out prompt, batch 1."""

    prompt_tokens: int = 64
    new_tokens: int = 8
    repeats: int = 3  # timed generations after one warm-up; the median is reported


@dataclass
class ArmSettings:
    enabled: bool = True
    overrides: list[str] = field(default_factory=list)  # changes to `run` for this arm, e.g. "optim.lr=1e-5"


def _disabled() -> ArmSettings:
    return ArmSettings(enabled=False)


@dataclass
class ArmsConfig:
    """The trainings of every seed; the runner sets ``thinking`` (false for the control), seed and paths."""

    control: ArmSettings = field(default_factory=ArmSettings)  # the plain causal LM on the same data
    thinking: ArmSettings = field(default_factory=ArmSettings)  # Quiet-STaR
    # Quiet-STaR with a thought-length curriculum: its overrides must set thought.schedule.
    curriculum: ArmSettings = field(default_factory=_disabled)


@dataclass
class StudentsConfig:
    """Fast Quiet-STaR's NTP stage: a thought-free student trained toward each exported thinking arm."""

    kinds: list[str] = field(default_factory=list)  # "ntp_policy" (the paper's), "distill"; [] = no students
    # Enabled thinking arms, or saved Quiet-STaR folders (a quietstar-train run's final/) trained elsewhere.
    teachers: list[str] = field(default_factory=lambda: list(THINKING_ARMS))
    # Changes to `run` for the students (their optimiser, stage.* settings); the runner sets stage.kind
    # and stage.teacher.
    overrides: list[str] = field(default_factory=list)
    keep_teachers: bool = False  # keep the teachers' exported folders (a few hundred MB each at 135M)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    output_dir: str = "runs/experiment"
    training_seeds: list[int] = field(default_factory=lambda: [0])  # every arm and student, per seed
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    metric_limit: int = 50  # held-out problems scored by the paper's GSM8K metric (0: skip)
    # "corpus": the generated corpus's held-out problems; otherwise a load_examples source for GSM8K
    # ("hub": the GSM8K test set, "sample": the bundled sample, or a .jsonl path).
    metric_source: str = "corpus"
    arms: ArmsConfig = field(default_factory=ArmsConfig)
    students: StudentsConfig = field(default_factory=StudentsConfig)
    run: RunConfig = field(default_factory=RunConfig)  # what every arm shares


def arm_run(cfg: ExperimentConfig, overrides: list[str], stage: dict | None = None, where: str = "run") -> RunConfig:
    """``cfg.run`` with ``overrides`` applied (and, for a student, a ``stage`` section first)."""
    data = to_dict(cfg.run)
    if stage is not None:
        data["stage"] = {**(data.get("stage") or {}), **stage}
    try:
        return from_dict(RunConfig, apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def enabled_arms(cfg: ExperimentConfig) -> list[str]:
    return [name for name in ("thinking", "curriculum", "control") if getattr(cfg.arms, name).enabled]


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every problem a run would meet late, raised before anything trains."""
    if cfg.metric_source == "corpus" and cfg.corpus.source != GENERATED and cfg.metric_limit:
        raise ConfigError(f"metric_source 'corpus' needs the generated corpus (its problems have answers), but corpus.source "
                          f"is {cfg.corpus.source!r}; set metric_source to hub (GSM8K's test set), a .jsonl file, or metric_limit=0")
    check_corpus(cfg.corpus)
    if not cfg.training_seeds:
        raise ConfigError("training_seeds is empty: give at least one seed")
    if cfg.heldout.every < 0 or cfg.heldout.max_windows < 1 or cfg.heldout.final_max_windows < 1:
        raise ConfigError("heldout.every must be >= 0 and heldout.max_windows / final_max_windows >= 1")
    if cfg.cost.prompt_tokens < 1 or cfg.cost.new_tokens < 1 or cfg.cost.repeats < 1:
        raise ConfigError("cost.prompt_tokens, cost.new_tokens and cost.repeats must be >= 1")
    if not enabled_arms(cfg) and not (cfg.students.kinds and all(map(is_saved_quietstar, cfg.students.teachers))):
        raise ConfigError("every arm is disabled: enable arms.thinking, arms.control or arms.curriculum, or train "
                          "students only, from teachers that are saved Quiet-STaR folders")
    for name in enabled_arms(cfg):
        run = arm_run(cfg, getattr(cfg.arms, name).overrides, where=f"arms.{name}.overrides")
        if name == "curriculum" and run.thought.schedule is None:
            raise ConfigError("arms.curriculum needs a thought-length schedule in its overrides, e.g. "
                              "\"thought.schedule={stages: [{from_step: 0, n_thought_tokens: 6}, {from_step: 20, n_thought_tokens: 4}]}\"")
        if name != "curriculum" and run.thought.schedule is not None:
            raise ConfigError(f"arms.{name} has a thought.schedule; only arms.curriculum shortens thoughts (move it there)")
    unknown = [k for k in cfg.students.kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"students.kinds: unknown {unknown}; use any of {list(KINDS)}")
    if cfg.students.kinds:
        for teacher in cfg.students.teachers:
            if teacher not in THINKING_ARMS and is_saved_quietstar(teacher):
                continue  # a thinking model trained elsewhere
            if teacher not in THINKING_ARMS:
                raise ConfigError(f"students.teachers: {teacher!r} is neither a thinking arm ({list(THINKING_ARMS)}) "
                                  "nor a saved Quiet-STaR folder")
            if not getattr(cfg.arms, teacher).enabled:
                raise ConfigError(f"students.teachers names {teacher!r}, but arms.{teacher} is disabled: enable it or drop it")
        if not cfg.students.teachers:
            raise ConfigError("students.kinds is set but students.teachers is empty: name the thinking arms to learn from")
        arm_run(cfg, cfg.students.overrides, stage={"kind": cfg.students.kinds[0], "teacher": "<teacher>"},
                where="students.overrides")
    return cfg


def load_experiment_config(path: str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    if path and not Path(path).is_file():
        raise ConfigError(f"experiment config {path!r} does not exist; the recipes are in train/experiments/")
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    data = apply_overrides(data or {}, overrides or [], root=ExperimentConfig)
    return check_experiment(from_dict(ExperimentConfig, data))
