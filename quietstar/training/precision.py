"""The precision policy (``optim.precision``): the dtype the trained weights and AdamW's moments are
kept in, and the dtype the forward computes in -- one policy on every launcher.

- ``bf16_weights_bf16_optimizer``: the reference run (quiet-star-train.py loads the model with
  ``torch_dtype=bfloat16`` and trains those weights with AdamW: no fp32 copy). Weights, gradients,
  ``exp_avg`` and ``exp_avg_sq`` are bf16. At lr 1e-6 an Adam step of ~1e-6 is below half a bf16
  step of any weight above ~5e-4, so most base weights stay put and the delimiters (100x effective
  lr) and the mixing head do most of the learning. ``optim.mixed_precision`` bf16 adds an autocast
  (softmaxes and losses in fp32), ``no`` computes in the weights' bf16 as the reference did.
- ``fp32_master_bf16_compute``: fp32 weights and moments, forward and backward autocast to bf16:
  every weight moves, however small its update.
- ``fp32``: fp32 weights, moments and compute.
- ``auto``: the weights as ``model.dtype`` builds them (LoRA adapters as peft makes them) and the
  autocast ``optim.mixed_precision`` asks for; no launcher adds a master copy.

Why this module: accelerate turns ``mixed_precision="bf16"`` into a different policy per launcher --
an autocast under DDP, an fp32 copy of every trainable parameter under FSDP2 (``fsdp2_prepare_model``
upcasts them), DeepSpeed's bf16 mode (fp32 master weights) under DeepSpeed. So the loop autocasts
itself and asks accelerate for mixed precision only where that is how the policy is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from .config import ConfigError, OptimConfig

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
POLICY_WEIGHTS = {"bf16_weights_bf16_optimizer": "bfloat16", "fp32_master_bf16_compute": "float32", "fp32": "float32"}
POLICY_COMPUTE = {"bf16_weights_bf16_optimizer": ("bf16", "no"), "fp32_master_bf16_compute": ("bf16",), "fp32": ("no",)}


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    name: str  # what the log calls it
    weights: str  # the trained parameters' dtype ("float32", "bfloat16", "float16")
    compute: str  # "bf16" / "fp16": autocast to it; "no": compute in the weights' dtype
    cast: bool  # cast every parameter to ``weights`` after building (explicit policies); auto keeps them

    def describe(self) -> str:
        compute = f"{self.compute} autocast" if self.compute != "no" else f"compute in {DTYPE_NAMES[self.weights]}"
        return f"precision {self.name} ({DTYPE_NAMES[self.weights]} weights and AdamW moments, {compute})"

    def autocast(self, device_type: str):
        """The forward's autocast (fp16 is accelerate's: it needs its grad scaler)."""
        if self.compute != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def resolve_precision(model_dtype: str, optim: OptimConfig, cuda_bf16: bool) -> PrecisionPolicy:
    """The policy a run trains with; ``cuda_bf16``: a CUDA device with bf16 (what 'auto' autocast follows)."""
    if optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("optim.mixed_precision fp16 needs CUDA; use 'no' or 'bf16' on CPU")
    if optim.precision != "auto":
        allowed = POLICY_COMPUTE[optim.precision]  # 'auto' autocast: bf16 where the policy and a CUDA device allow it
        compute = optim.mixed_precision if optim.mixed_precision in allowed else ("bf16" if cuda_bf16 and "bf16" in allowed else allowed[-1])
        return PrecisionPolicy(optim.precision, POLICY_WEIGHTS[optim.precision], compute, cast=True)
    compute = optim.mixed_precision if optim.mixed_precision != "auto" else ("bf16" if cuda_bf16 else "no")
    weights = DTYPE_NAMES[model_dtype]
    if model_dtype == "float32":
        name = "fp32" if compute == "no" else f"fp32_master_{compute}_compute"
    else:
        name = f"{weights}_weights_{weights}_optimizer"
    return PrecisionPolicy(name, model_dtype, compute, cast=False)


def launch_kind(env=None) -> str:
    """'deepspeed', 'fsdp' (accelerate's own FSDP2, CUDA only) or 'plain' (one process, DDP, FSDP2 on CPU)."""
    env = os.environ if env is None else env
    if not torch.cuda.is_available():
        return "plain"  # DeepSpeed is refused without CUDA; FSDP2 on CPU is sharded by sharding.py
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "fsdp" if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "plain"


def accelerate_mixed_precision(policy: PrecisionPolicy, launch: str) -> str:
    """What ``Accelerator(mixed_precision=...)`` must be told so that it builds ``policy`` (the loop
    autocasts itself): fp16 needs accelerate's grad scaler; FSDP2 keeps fp32 masters when told bf16
    and upcasts bf16 weights to fp32 when told anything but 'no'; DeepSpeed needs its bf16 mode for
    bf16 weights (``deepspeed_bf16`` says which master dtype)."""
    if policy.compute == "fp16":
        return "fp16"
    if launch == "deepspeed":
        return "bf16" if "bf16" in (policy.compute, DTYPE_NAMES[policy.weights]) else "no"
    if launch == "fsdp" and policy.weights == "float32" and policy.compute == "bf16":
        return "bf16"  # MixedPrecisionPolicy(param_dtype=bf16) over fp32 sharded masters
    return "no"


def deepspeed_bf16(policy: PrecisionPolicy) -> dict:
    """The ``bf16`` section of the DeepSpeed config for ``policy``: bf16 weights keep bf16 masters and
    bf16 Adam moments (keys of DeepSpeed's low-precision master states, deepspeedai/DeepSpeed PR 7700)."""
    bf16_weights = policy.weights == "bfloat16"
    return {"enabled": bf16_weights or policy.compute == "bf16",
            "bf16_master_weights_and_grads": bf16_weights, "bf16_optimizer_states": bf16_weights}


def deepspeed_plugin(policy: PrecisionPolicy, batch_size: int, grad_accum: int, world_size: int):
    """accelerate's DeepSpeedPlugin as ``accelerate launch`` configured it (environment), with the
    policy's bf16 section and the run's batch arithmetic written in (DeepSpeed checks
    train_batch_size = micro-batch x accumulation x processes)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(gradient_accumulation_steps=grad_accum)
    config = plugin.deepspeed_config
    wanted = deepspeed_bf16(policy)
    given = config.get("bf16", {})
    clash = {k: given[k] for k in wanted if k != "enabled" and k in given and given[k] != wanted[k]}
    if clash:
        raise ConfigError(f"the DeepSpeed config file sets bf16 {clash}, which contradicts {policy.describe()}; "
                          "remove those keys (the run config's optim.precision decides)")
    config["bf16"] = {**given, **wanted}
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["train_batch_size"] = batch_size * grad_accum * world_size
    return plugin


def cast_parameters(model, policy: PrecisionPolicy) -> None:
    """Every parameter to the policy's dtype (explicit policies); buffers such as RoPE's inverse
    frequencies keep theirs."""
    if not policy.cast:
        return
    dtype = getattr(torch, policy.weights)
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def state_dtypes(model, optimizer) -> dict[str, list[str]]:
    """Dtypes of the trainable parameters (this process's shards) and of AdamW's moments, for the trace."""
    state = getattr(optimizer, "optimizer", optimizer).state
    out = {"parameters": {str(p.dtype) for p in model.parameters() if p.requires_grad}, "exp_avg": set(), "exp_avg_sq": set()}
    for moments in state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                out[key].add(str(moments[key].dtype))
    return {key: sorted(values) for key, values in out.items()}
