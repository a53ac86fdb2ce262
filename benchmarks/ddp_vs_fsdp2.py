"""DDP vs FSDP2 on CPU processes (gloo): a Quiet-STaR training step, 2 processes, one run each.

    python benchmarks/ddp_vs_fsdp2.py                          # tiny model (the tests' one)
    python benchmarks/ddp_vs_fsdp2.py --models tiny,wide --steps 3 --warmup 1

The FSDP2 side shards exactly as ``quietstar-train`` does on CPU (``quietstar.training.sharding``:
each decoder layer a unit, then the root); the DDP side is ``DistributedDataParallel``. Each process
trains its own random batch (B sequences of L tokens, as a data-parallel run does). Reported per
process: peak RSS (everything: Python, libraries, model, activations) and its growth over the
process's RSS before the model was built, plus the parameter, gradient and AdamW state it holds
(4 x its parameter elements x 4 bytes in fp32); tokens/s counts base tokens of both processes.
``wide`` is harness.py's ``wide-llama`` (4 layers, hidden 512, about 13M parameters), big enough for
the sharded model state to show against the ~600 MB a Python process with torch and transformers holds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

WORLD = 2


def _build(model_name: str, args):
    from quietstar import QuietStarForCausalLM
    from quietstar.assets import byte_tokenizer, tiny_random_llama

    tokenizer = byte_tokenizer()
    if model_name == "tiny":
        base = tiny_random_llama(len(tokenizer), seed=0)
    elif model_name == "wide":
        base = harness.random_base("wide-llama")  # its vocabulary is the byte tokenizer's 257
    else:
        raise SystemExit(f"--models: unknown model {model_name!r}; use tiny or wide")
    model = QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, n_thought_tokens=args.n_thought,
                                           n_talk_tokens=args.n_talk, n_passes=args.passes, attn_implementation=args.attn)
    return model.train(), tokenizer


def _worker(rank: int, mode: str, model_name: str, args, port: int, queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from quietstar.training.sharding import CpuFsdpPlan, shard_model, shard_summary

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")  # outputs only read
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    before_model = harness.peak_rss_mib()
    torch.manual_seed(0)
    model, tokenizer = _build(model_name, args)
    if mode == "ddp":
        model = DistributedDataParallel(model)
    else:
        shard_model(model, CpuFsdpPlan(reshard_after_forward=True))
    held = shard_summary(model)["local_numel"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(rank)  # each process its own batch, as in data parallelism
    ids = torch.randint(0, len(tokenizer) - 1, (args.batch, args.seq_len), generator=generator)
    mask = torch.ones_like(ids)

    def step():
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # barriers around each step: both processes start together, the step time is the slower one's
    timing = harness.time_steps(step, args.steps, warmup=args.warmup, sync=dist.barrier)
    peak = harness.peak_rss_mib()
    queue.put(dict(rank=rank, step_ms=timing.wall_ms, peak_mib=peak, growth_mib=peak - before_model,
                   state_mib=4 * held * 4 / harness.MIB, held=held, numel=shard_summary(model)["numel"]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(mode: str, model_name: str, args) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, mode, model_name, args, port, queue)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"the {mode} {model_name} run failed (exit code {p.exitcode}); its traceback is above")
    return sorted((queue.get(timeout=10) for _ in procs), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_step_arguments(parser, models="tiny")  # shapes: tiny, wide
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    S = args.n_thought + args.n_talk + 1
    print(f"{harness.machine_stamp()}\n{WORLD} CPU processes (gloo), {args.threads} thread(s) each; L = {args.seq_len}, "
          f"batch = {args.batch} per process, N = {args.n_thought}, K = {args.n_talk}, S = {S}, P = {args.passes}, "
          f"attention = {args.attn}, median of {args.steps} steps\n")
    print("| model | parallelism | step ms (median) | tokens/s (2 processes) | parameter elements held per process | "
          "params + grads + AdamW per process (MiB) | peak RSS per process (MiB) | RSS growth per process (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for mode in ("ddp", "fsdp2"):
            rows = run_pair(mode, model_name, args)
            step_ms = max(r["step_ms"] for r in rows)
            tokens_per_s = WORLD * args.batch * args.seq_len / step_ms * 1e3
            per = lambda key, fmt: " / ".join(format(r[key], fmt) for r in rows)  # noqa: E731  rank 0 / rank 1
            print(f"| {model_name} | {'DDP' if mode == 'ddp' else 'FSDP2'} | {step_ms:.0f} | {tokens_per_s:.1f} | "
                  f"{per('held', 'd')} of {rows[0]['numel']} | {per('state_mib', '.1f')} | {per('peak_mib', '.0f')} | "
                  f"{per('growth_mib', '.0f')} |")


if __name__ == "__main__":
    main()
