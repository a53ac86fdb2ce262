"""Peak memory of one Quiet-STaR training step at a real vocabulary: full logits against the memory-light forward.

    python benchmarks/logits_memory.py                                   # CPU: SmolLM2-135M shape, L = 128 and 256
    python benchmarks/logits_memory.py --seq-len 256 --chunk-elements 4194304,16777216

The model is SmolLM2-135M's architecture (30 layers, hidden 576, vocab 49152) with random weights
(``train_throughput.smollm2_shape_random``): memory and time do not depend on the weights. A step is
forward + backward with labels (no optimiser: its state is the same for both paths), N = 9, K = 4,
P = 2, batch 1 by default, with the base model's gradient checkpointing on (as a run at this scale
would have it: without it the replay's activations over (1 + S) L tokens, ~10 GB at L = 256, hide
everything else; ``--no-gradient-checkpointing`` to keep them). ``full`` is ``model(..., return_logits=True)`` (the materialised
``[B, L, V]`` / ``[B, L, K, V]`` logits, as before issue 10); ``light`` is ``return_logits=False``
(quietstar/chunked_log_probs.py) at each ``--chunk-elements``.

Each (L, path) runs in its own fresh process, with the same seed, so the same weights and thoughts:
the loss column must agree. Memory, on CPU, two ways:

* **tensor peak**: the step's peak of live tensor bytes above those live when it starts (the
  weights; the previous gradients are freed before), from the
  allocation trace of ``torch.profiler`` (``profile_memory=True``: every CPU tensor allocation and
  free, in order; the running sum's maximum). Exactly the tensors the step holds at its worst
  moment (activations, logits, saved tensors, gradients), unaffected by allocator caching or
  Python; the step runs once unprofiled first, so nothing is allocated for the first time there.
* **RSS peak**: ``ru_maxrss`` of the fresh process after its first step (model, gradients, Python,
  libraries, the allocator's unreturned pages): what the machine had to have.

On CUDA the tensor peak is ``torch.cuda.max_memory_allocated`` above the step's start instead.
The step time is the median of the unprofiled steps (the machine may be shared); with ``--steps 0``
(CPU) the profiled step is the only one, and the time and RSS are its own (profiler overhead included).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time


def run_one(seq_len: int, path: str, chunk_elements: int, args, queue) -> None:
    import torch

    from quietstar import QuietStarForCausalLM
    from train_throughput import smollm2_shape_random

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = smollm2_shape_random()
    if args.layers < len(base.model.layers):  # same width and vocabulary, fewer layers: same logits, less compute
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=args.n_thought,
                                           n_talk_tokens=args.n_talk, n_passes=args.passes,
                                           logits_chunk_elements=chunk_elements).to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(0, vocab, (args.batch, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            out = model(ids, attention_mask=mask, labels=ids, return_logits=path == "full",
                        generator=torch.Generator(device=device).manual_seed(2))
        out.loss.backward()
        return out.loss.item()

    times, cpu_times, rss_peak = [], [], None
    for _ in range(max(args.steps, 1) if cuda else args.steps):  # CUDA measures the unprofiled steps
        model.zero_grad(set_to_none=True)  # every step allocates its gradients, as a first step does
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(cpu_seconds() - cpu0)
        if rss_peak is None:
            rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if cuda:
        tensor_peak = (torch.cuda.max_memory_allocated() - start_bytes) / 2**20
    else:
        model.zero_grad(set_to_none=True)  # outside the trace: the peak is above the weights alone
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        tensor_peak, loss = profiled_tensor_peak(step)
        tensor_peak /= 2**20
        if not times:  # --steps 0: the profiled step is the process's only one; its time is the profiler's too
            times.append(time.perf_counter() - t0)
            cpu_times.append(cpu_seconds() - cpu0)
            rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(dict(seq_len=seq_len, path=path, chunk=chunk_elements, loss=loss, step_s=statistics.median(times), cpu_s=statistics.median(cpu_times),
                   tensor_peak_mib=tensor_peak, rss_peak_mib=rss_peak,
                   device=torch.cuda.get_device_name() if cuda else cpu_name()))


def profiled_tensor_peak(step) -> tuple[int, float]:
    """(max over the step of bytes allocated - bytes freed since it began, from the profiler's
    allocation trace; the step's loss)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # + allocation, - free
        live += nbytes
        peak = max(peak, live)
    return peak, loss


def cpu_seconds() -> float:
    """CPU time of this process (all threads): on a shared machine, steadier than the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", default="128,256", help="comma-separated L values")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n-thought", type=int, default=9, help="N")
    parser.add_argument("--n-talk", type=int, default=4, help="K")
    parser.add_argument("--passes", type=int, default=2, help="P")
    parser.add_argument("--chunk-elements", default=str(1 << 24), help="comma-separated logits_chunk_elements for 'light'")
    parser.add_argument("--steps", type=int, default=1,
                        help="unprofiled steps per process (time: their median); CPU: 0 = only the profiled step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30, help="keep the first LAYERS of SmolLM2's 30 (logits unchanged)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the paths of one L at the same time (memory is per process; compare CPU s, not wall s)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep every layer's activations (L = 256 then needs > 12 GB on CPU)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_throughput, in the spawned children too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]))

    ctx = mp.get_context("spawn")
    rows = []
    for seq_len in [int(x) for x in args.seq_len.split(",")]:
        runs = [("full", 1 << 24)] + [("light", int(c)) for c in args.chunk_elements.split(",")]
        batches = [runs] if args.parallel else [[run] for run in runs]
        for batch in batches:
            started = []
            for path, chunk in batch:
                queue = ctx.Queue()
                proc = ctx.Process(target=run_one, args=(seq_len, path, chunk, args, queue))
                proc.start()
                started.append((path, proc, queue))
            for path, proc, queue in started:
                proc.join()  # a small dict: it fits the queue's pipe, so joining first is safe
                if proc.exitcode != 0:
                    raise SystemExit(f"the L = {seq_len} {path} step failed (exit code {proc.exitcode}); its traceback is above")
                rows.append(queue.get(timeout=10))
                print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M shape (vocab 49152, {args.layers} of 30 layers), batch {args.batch}, N = {args.n_thought}, K = {args.n_talk}, "
          f"P = {args.passes}, forward + backward, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; device = {rows[0]['device']}, threads = {args.threads}\n")
    print("| L | path | logits_chunk_elements | tensor peak MiB | RSS peak MiB | step wall s | step CPU s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        full = next(r for r in rows if r["seq_len"] == row["seq_len"] and r["path"] == "full")
        ratio = "" if row is full else f" ({full['tensor_peak_mib'] / row['tensor_peak_mib']:.1f}x less)"
        chunk = "-" if row is full else f"{row['chunk']:,}"
        print(f"| {row['seq_len']} | {row['path']} | {chunk} | {row['tensor_peak_mib']:.0f}{ratio} | "
              f"{row['rss_peak_mib']:.0f} | {row['step_s']:.1f} | {row['cpu_s']:.1f} | {row['loss']:.6f} |")


if __name__ == "__main__":
    main()
