"""``quietstar-train`` with a per-step trace, for the tests of real (multi-process) runs.

    QUIETSTAR_TRACE=/tmp/run-trace python -m tests.trace_run --config ... --set ...   (from the repository root)

Every process appends one JSON line per optimiser step to ``$QUIETSTAR_TRACE.rank<R>.jsonl``: its
sample ids, its last micro-batch's loss, the step's reduced metrics, a hash of the full parameters
(gathered under FSDP2: the loop calls ``on_step`` on every process), the dtypes of the parameters
and AdamW moments, and under FSDP2 what this process holds. ``--accelerate-config`` re-launches this
module, so the processes it starts trace too.
"""

import hashlib
import json
import os
import sys

from quietstar.training.cli import main
from quietstar.training.precision import state_dtypes
from quietstar.training.sharding import full_tensor, is_fully_sharded, shard_summary

TRACE_ENV = "QUIETSTAR_TRACE"


def param_hash(model) -> str:
    """Hash of the full parameters (gathered when sharded: every process must call it)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(full_tensor(p.detach()).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tracer(prefix: str):
    """An ``on_step`` that appends each step's record to ``<prefix>.rank<R>.jsonl``."""

    def on_step(report) -> None:
        record = {"step": report.step, "rank": report.rank, "sample_ids": report.result.sample_ids,
                  "loss": float(report.result.terms[-1]["loss"]), "param_hash": param_hash(report.model),
                  "metrics": report.metrics, "dtypes": state_dtypes(report.model, report.optimizer)}
        if is_fully_sharded(report.model):  # what this process holds: tests check the model is really sharded
            record["shards"] = shard_summary(report.model)
        with open(f"{prefix}.rank{report.rank}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    return on_step


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], on_step=tracer(os.environ[TRACE_ENV]), module="tests.trace_run"))
