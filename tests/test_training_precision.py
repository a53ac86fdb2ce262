"""optim.precision is the same policy on every launcher: the dtypes of the parameters and of AdamW's
exp_avg / exp_avg_sq after a step, on one process, DDP (2 processes, gloo) and FSDP2 (fully_shard,
gloo); accelerate's own FSDP2 preparation (the GPU path) given what the loop tells it; and the
DeepSpeed config the loop hands to accelerate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_runs import ROOT, env, run, trace

from quietstar.training.config import ConfigError
from quietstar.training.config_checks import validate
from quietstar.training.config_loading import load_config
from quietstar.training.precision import accelerate_mixed_precision, deepspeed_plugin, resolve_precision

RECIPE = ROOT / "train" / "configs" / "mistral7b_openwebmath.yaml"
TINY = ROOT / "train" / "configs" / "tiny_test.yaml"
ONE_STEP = ["optim.steps=1", "checkpoint.every=0", "checkpoint.export=false", "model.dtype=bfloat16"]
EXPECTED = {"bf16_weights_bf16_optimizer": "torch.bfloat16", "fp32_master_bf16_compute": "torch.float32"}


# A launch costs ~10-60 s on two shared cores: the reference policy on every launcher, the fp32 masters
# on FSDP2 (where the loop, not accelerate, casts and autocasts).
@pytest.mark.parametrize("launch, policy", [("ddp1", "bf16_weights_bf16_optimizer"), ("ddp2", "bf16_weights_bf16_optimizer"),
                                            ("fsdp2", "bf16_weights_bf16_optimizer"), ("fsdp2", "fp32_master_bf16_compute")])
def test_parameter_and_adam_state_dtypes_after_one_step(launch, policy, tmp_path):
    # The weights are built in bf16 either way: fp32_master_bf16_compute must keep fp32 copies.
    out = tmp_path / "run"
    proc = run(launch, out, *ONE_STEP, f"optim.precision={policy}", "optim.mixed_precision=bf16")
    assert proc.stdout.splitlines()[0].endswith(f"precision {policy} "
                                                 f"({'bf16' if 'bf16_w' in policy else 'fp32'} weights and AdamW moments, bf16 autocast)")
    for rank in (0, 1) if launch != "ddp1" else (0,):
        (record,) = trace(out, rank)
        dtype = EXPECTED[policy]
        assert record["dtypes"] == {"parameters": [dtype], "exp_avg": [dtype], "exp_avg_sq": [dtype]}, (launch, rank)
        if launch == "fsdp2":
            assert record["shards"]["replicated"] == [], "not sharded: the dtypes would not be FSDP2's"


# accelerate's fsdp2_prepare_model (its FSDP2 path on GPUs) run on one CPU process: it upcasts every
# trainable parameter to fp32 unless told mixed_precision 'no'. The loop's answer for each policy.
FSDP2_PREPARE = """
import os, sys, types, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from accelerate import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from quietstar.training.config_loading import load_config
from quietstar.training.optimizer import make_optimizer
from quietstar.training.models import build_model
from quietstar.training.precision import accelerate_mixed_precision, cast_parameters, resolve_precision, state_dtypes
PartialState(cpu=True)
cfg = load_config("train/configs/tiny_test.yaml", ["model.dtype=bfloat16", f"optim.precision={sys.argv[1]}",
                                                   "optim.mixed_precision=bf16"])
policy = resolve_precision(cfg.model.dtype, cfg.optim, cuda_bf16=True)
mixed = accelerate_mixed_precision(policy, "fsdp")
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                        transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
if mixed != "no":
    plugin.set_mixed_precision(mixed)  # what AcceleratorState does with the Accelerator's mixed_precision
accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision=mixed,
                                    is_main_process=True, device=torch.device("cpu"), parallelism_config=None)
model, _ = build_model(cfg.model, cfg.thought)
cast_parameters(model, policy)
model = fsdp2_prepare_model(accelerator, model)
optimizer = make_optimizer(model, cfg, "cpu")
ids = torch.randint(0, 256, (2, 24))
with policy.autocast("cpu"):
    loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
loss.backward()
optimizer.step()
print(mixed, state_dtypes(model, optimizer))
"""


@pytest.mark.parametrize("policy, port", [("bf16_weights_bf16_optimizer", "29611"), ("fp32_master_bf16_compute", "29612")])
def test_accelerates_own_fsdp2_preparation_keeps_the_policy(policy, port):
    proc = subprocess.run([sys.executable, "-c", FSDP2_PREPARE, policy, port], env=env(), capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mixed, dtypes = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    dtype = EXPECTED[policy]
    assert json.loads(dtypes.replace("'", '"')) == {"parameters": [dtype], "exp_avg": [dtype], "exp_avg_sq": [dtype]}
    assert mixed == ("no" if policy.startswith("bf16") else "bf16")


def deepspeed_launch_env(config_file: Path) -> dict:
    """The environment `accelerate launch --config_file` gives a DeepSpeed run's processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--module", "quietstar.training.cli"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    return prepare_deepspeed_cmd_env(args)[1]


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_the_deepspeed_config_follows_the_policy_and_the_batch(policy, monkeypatch):
    launch_env = deepspeed_launch_env(ROOT / "train" / "accelerate" / "deepspeed_zero3.yaml")
    for key, value in launch_env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setitem(os.environ, key, value)
    cfg = load_config(RECIPE, [f"optim.precision={policy}"])
    resolved = resolve_precision(cfg.model.dtype, cfg.optim, cuda_bf16=True)
    plugin = deepspeed_plugin(resolved, batch_size=1, grad_accum=1, world_size=8)
    plugin.set_mixed_precision(accelerate_mixed_precision(resolved, "deepspeed"))  # as AcceleratorState does
    ds = plugin.deepspeed_config
    bf16_masters = policy == "bf16_weights_bf16_optimizer"
    assert ds["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": bf16_masters, "bf16_optimizer_states": bf16_masters}
    assert ds["zero_optimization"]["stage"] == 3
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 1, 1)


def test_policy_and_autocast_must_agree():
    with pytest.raises(ConfigError, match="fp32_master_bf16_compute computes in bf16.*set optim.mixed_precision to 'bf16'"):
        validate(load_config(TINY, ["optim.precision=fp32_master_bf16_compute", "optim.mixed_precision='no'"]))
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(TINY, ["optim.precision=bf16"])
    # auto names what model.dtype builds; no launcher adds an fp32 copy to bf16 weights.
    auto = resolve_precision("bfloat16", load_config(TINY, ["optim.mixed_precision=bf16"]).optim, cuda_bf16=True)
    assert auto.name == "bf16_weights_bf16_optimizer" and not auto.cast
    assert accelerate_mixed_precision(auto, "fsdp") == "no"


def test_the_recipe_states_the_reference_policy():
    cfg = load_config(RECIPE)
    policy = resolve_precision(cfg.model.dtype, cfg.optim, cuda_bf16=True)
    assert (cfg.optim.precision, policy.weights, policy.compute) == ("bf16_weights_bf16_optimizer", "bfloat16", "bf16")
    # accelerate's FSDP2 would upcast the bf16 weights to fp32 masters if told anything but "no".
    assert {launch: accelerate_mixed_precision(policy, launch) for launch in ("plain", "fsdp", "deepspeed")} == \
        {"plain": "no", "fsdp": "no", "deepspeed": "bf16"}
