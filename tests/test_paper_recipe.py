"""train/configs/mistral7b_openwebmath.yaml is the official run (quiet-star-train.py, eval_helpers.py)."""

from pathlib import Path

from quietstar.training.batch import batch_plan
from quietstar.training.config_loading import load_config
from quietstar.training.optimizer import lr_lambda

RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "mistral7b_openwebmath.yaml"


def test_the_mistral_recipe_is_the_reference_run():
    cfg = load_config(RECIPE)
    t, d, o = cfg.thought, cfg.data, cfg.optim
    assert (t.n_thought_tokens, t.n_talk_tokens, t.n_passes) == (12 - 3, 4, 2)  # n_ahead 12, n_ahead_talk 4
    assert (t.reinforce_temperature, t.policy_loss_weight, t.base_loss_weight, t.embedding_scale) == (3.0, 1e6, 0.5, 100.0)
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.model.dtype == "bfloat16"
    assert (o.steps, o.lr, o.warmup_steps, o.weight_decay, o.max_grad_norm) == (100, 1e-6, 20, 1e-3, 1.0)
    one_process = batch_plan(cfg, world_size=1)  # the reference: one process, 4 sequences x 2 accumulated
    assert (o.global_batch, one_process.batch_size, one_process.grad_accum) == (8, 4, 2)
    assert (o.precision, cfg.model.dtype) == ("bf16_weights_bf16_optimizer", "bfloat16")  # no fp32 master copy
    assert (d.path, d.split, d.seq_len, d.windows, d.max_documents) == ("open-web-math/open-web-math", "train", 256, "document", 1000)
    assert o.steps * o.global_batch <= d.max_documents  # each document used at most once, on any process count
    # lr: linear warm-up over 20 steps, then constant (the reference's decay spans 100k steps: 0.9992 at step 100)
    factor = lr_lambda(warmup=o.warmup_steps, total=o.steps, min_ratio=o.min_lr_ratio)
    assert factor(o.warmup_steps - 1) == 1.0 and all(factor(s) == 1.0 for s in range(o.warmup_steps, o.steps + 1))
    assert factor(0) < 0.1
