"""``quietstar-train --config train/configs/NAME.yaml [--set key=value ...] [--resume] [--accelerate-config FILE]``

In-process on one device by default. ``--accelerate-config FILE`` checks the file against this
machine's devices and re-launches the same command under ``accelerate launch``; ``accelerate launch``
or ``torchrun`` can also start ``python -m quietstar.training.cli`` (or ``train/train.py``) directly.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

from .config import ConfigError
from .config_loading import load_config, to_dict

GPU_TYPES = {"MULTI_GPU", "FSDP", "DEEPSPEED"}


def check_accelerate_config(path: str | os.PathLike) -> dict:
    """Read an accelerate config file and check it against this machine; returns it."""
    import torch

    from .sharding import check_cpu_fsdp_settings

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"accelerate config {str(p)!r} does not exist; the shipped ones are in train/accelerate/")
    conf = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    kind = str(conf.get("distributed_type", "NO")).upper()
    n_proc = int(conf.get("num_processes", 1))
    per_machine = math.ceil(n_proc / max(1, int(conf.get("num_machines", 1))))
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if conf.get("use_cpu") and n_proc > 1:
        raise ConfigError(
            f"{p}: use_cpu with num_processes {n_proc} makes `accelerate launch` start ONE process; for CPU data "
            "parallelism use distributed_type MULTI_GPU with use_cpu false (see train/accelerate/cpu_2proc.yaml)"
        )
    if kind in GPU_TYPES and cuda:
        if per_machine > cuda:
            raise ConfigError(f"{p} names {per_machine} processes per machine but this machine has {cuda} CUDA devices; "
                              f"set num_processes to at most {cuda * max(1, int(conf.get('num_machines', 1)))}")
    elif kind == "DEEPSPEED":
        raise ConfigError(f"{p} is a DEEPSPEED config, which needs CUDA devices; this machine has none "
                          "(on CPU use train/accelerate/fsdp2_cpu_2proc.yaml or cpu_2proc.yaml)")
    else:
        if kind == "FSDP":  # runs on CPU through the launcher's own fully_shard, for the settings it supports
            check_cpu_fsdp_settings(conf.get("fsdp_config") or {}, str(p))
        cores = os.cpu_count() or 1
        if per_machine > cores:
            raise ConfigError(f"{p} names {per_machine} processes but this machine has no CUDA device and {cores} CPU cores; "
                              f"set num_processes to at most {cores} (e.g. train/accelerate/cpu_2proc.yaml)")
    return conf


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="quietstar-train", description="Train a Quiet-STaR model (see train/configs/).")
    parser.add_argument("--config", "-c", help="run config YAML (train/configs/NAME.yaml)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=1e-5 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from the newest complete checkpoint in output_dir (or the one given)")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="re-launch under `accelerate launch --config_file FILE` after checking it against this machine")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def relaunch(args, cfg, overrides: list[str], module: str) -> int:
    """``accelerate launch --config_file FILE --module MODULE`` with this command's config and overrides,
    after checking the file against this machine and the batch split against the data."""
    from .batch import batch_plan, check_budget

    settings = check_accelerate_config(args.accelerate_config)
    check_budget(cfg, batch_plan(cfg, int(settings.get("num_processes", 1))))  # the batch split and the data budget
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config]
    if int(settings.get("num_machines", 1)) == 1 and settings.get("main_process_port") is None:
        cmd += ["--main_process_port", "0"]  # one machine: a free port, not accelerate's fixed 29500 (two runs collide)
    cmd += ["--module", module]
    if args.config:
        cmd += ["--config", args.config]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.call(cmd)


def main(argv=None, on_step=None, module: str = "quietstar.training.cli") -> int:
    """The command; ``on_step`` is handed to ``train``, ``module`` is what ``--accelerate-config`` re-launches
    (a module whose ``main`` passes ``on_step`` on: the tests' tracing driver)."""
    args = parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        if args.print_config or args.accelerate_config:  # no train() here to validate: check before printing or launching
            from .config_checks import validate

            validate(cfg)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.accelerate_config:
            return relaunch(args, cfg, overrides, module)
        from .loop import train

        train(cfg, on_step)
    except ConfigError as error:
        print(f"quietstar-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
