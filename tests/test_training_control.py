"""The control run of an experiment (``thinking: false``): the same base weights, data order and
optimiser as a Quiet-STaR run, trained as a plain causal LM; and the per-step hook experiments use."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from quietstar.training.config_loading import load_config
from quietstar.training.data import build_dataset
from quietstar.training.loop import train
from quietstar.training.models import build_model
from trace_run import tracer

TINY = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_test.yaml"


def _cfg(out, thinking):
    return load_config(TINY, [f"output_dir={out}", f"thinking={thinking}", "optim.steps=2", "checkpoint.every=0",
                              "logging.progress_bar=false"])


def test_control_trains_the_plain_base_on_the_same_batches(tmp_path):
    calls, trace = [], {run: tracer(f"{tmp_path / run}-trace") for run in ("control", "thinking")}

    def on_step(report):
        calls.append((report.step, type(report.model).__name__, report.model.training, report.metrics is not None))
        trace["control"](report)

    control = train(_cfg(tmp_path / "control", "false"), on_step=on_step)
    train(_cfg(tmp_path / "thinking", "true"), on_step=trace["thinking"])
    assert calls == [(1, "LlamaForCausalLM", True, True), (2, "LlamaForCausalLM", True, True)]

    # Step 1's loss is the plain causal-LM loss of the initial base model on the first two micro-batches.
    cfg = _cfg(tmp_path / "x", "false")
    model, tokenizer = build_model(cfg.model, cfg.thought, seed=cfg.seed)
    data = build_dataset(cfg.data, tokenizer, batch_size=cfg.optim.batch_size, rank=0, world_size=1, seed=cfg.seed)
    with torch.no_grad():
        losses = []
        for _ in range(cfg.optim.grad_accum):
            batch = data.next_batch()
            losses.append(model.base_lm(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        labels=batch["input_ids"]).loss.item())
    first = control["history"][0]
    assert abs(first["loss"] - sum(losses) / len(losses)) < 1e-5
    assert set(first) >= {"loss", "nll_base", "grad_norm"} and "policy_loss" not in first

    # Same data order as the thinking run; the thinking run has its Quiet-STaR terms.
    traces = [[json.loads(line) for line in (tmp_path / f"{run}-trace.rank0.jsonl").read_text().splitlines()]
              for run in ("control", "thinking")]
    assert [t["sample_ids"] for t in traces[0]] == [t["sample_ids"] for t in traces[1]]
    assert "policy_loss" in traces[1][0]["metrics"]

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "control" / "final")  # a plain causal LM
    assert type(exported).__name__ == "LlamaForCausalLM"
