"""Peak memory of one Quiet-STaR training step at a real vocabulary: full logits against the memory-light forward.

    python benchmarks/logits_memory.py                                   # CPU: SmolLM2-135M shape, L = 128 and 256
    python benchmarks/logits_memory.py --seq-len 256 --chunk-elements 4194304,16777216

The model is SmolLM2-135M's architecture (30 layers, hidden 576, vocab 49152) with random weights
(harness.py's ``smollm2-shape``): memory and time do not depend on the weights. A step is
forward + backward with labels (no optimiser: its state is the same for both paths), N = 9, K = 4,
P = 2, batch 1 by default, with the base model's gradient checkpointing on (as a run at this scale
would have it: without it the replay's activations over (1 + S) L tokens, ~10 GB at L = 256, hide
everything else; ``--no-gradient-checkpointing`` to keep them). ``full`` is ``model(..., return_logits=True)`` (the materialised
``[B, L, V]`` / ``[B, L, K, V]`` logits); ``light`` is ``return_logits=False``
(quietstar/chunked_log_probs.py) at each ``--chunk-elements``.

Each (L, path) runs in its own fresh process, with the same seed, so the same weights and thoughts:
the loss column must agree. Memory, on CPU, two ways:

* **tensor peak**: the step's peak of live tensor bytes above those live when it starts (the
  weights; the previous gradients are freed before), from the
  allocation trace of ``torch.profiler`` (``profile_memory=True``: every CPU tensor allocation and
  free, in order; the running sum's maximum). Exactly the tensors the step holds at its worst
  moment (activations, logits, saved tensors, gradients), unaffected by allocator caching or
  Python; the step runs once unprofiled first, so nothing is allocated for the first time there.
* **RSS peak**: ``ru_maxrss`` of the fresh process after its unprofiled steps (model, gradients, Python,
  libraries, the allocator's unreturned pages): what the machine had to have.

On CUDA the tensor peak is ``torch.cuda.max_memory_allocated`` above the step's start instead.
The step time is the median of the unprofiled steps (the machine may be shared); with ``--steps 0``
(CPU) the profiled step is the only one, and the time and RSS are its own (profiler overhead included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def run_one(seq_len: int, path: str, chunk_elements: int, args, queue) -> None:
    import torch

    from quietstar import QuietStarForCausalLM

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = harness.random_base("smollm2-shape")
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

    start_bytes = 0

    def fresh_gradients():  # every step allocates its gradients, as a first step does
        nonlocal start_bytes
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()

    steps = max(args.steps, 1) if cuda else args.steps  # CUDA measures the unprofiled steps
    timing = harness.time_steps(step, steps, warmup=0, prepare=fresh_gradients)
    rss_peak, loss = harness.peak_rss_mib(), timing.result  # CPU: after the unprofiled steps
    if cuda:
        tensor_peak = harness.cuda_peak_mib(start_bytes)  # the weights alone were live at the start
    else:
        model.zero_grad(set_to_none=True)  # outside the trace: the peak is above the weights alone
        t0, cpu0 = time.perf_counter(), harness.process_cpu_seconds()
        tensor_peak, loss = profiled_tensor_peak(step)
        tensor_peak /= harness.MIB
        if not steps:  # --steps 0: the profiled step is the process's only one; its time is the profiler's too
            timing = harness.Timing(1e3 * (time.perf_counter() - t0), 1e3 * (harness.process_cpu_seconds() - cpu0))
            rss_peak = harness.peak_rss_mib()
    queue.put(dict(seq_len=seq_len, path=path, chunk=chunk_elements, loss=loss, step_ms=timing.wall_ms,
                   cpu_ms=timing.cpu_ms, tensor_peak_mib=tensor_peak, rss_peak_mib=rss_peak))


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
    print(harness.machine_stamp(args.threads))
    rows = []
    for seq_len in [int(x) for x in args.seq_len.split(",")]:
        runs = [(seq_len, "full", 1 << 24)] + [(seq_len, "light", int(c)) for c in args.chunk_elements.split(",")]
        for batch in ([runs] if args.parallel else [[run] for run in runs]):
            jobs = [(*run, args) for run in batch]
            rows += harness.in_fresh_processes(run_one, jobs, lambda job: f"the L = {job[0]} {job[1]} step")
            print(*rows[-len(jobs):], sep="\n", flush=True)
    print(f"\nSmolLM2-135M shape (vocab 49152, {args.layers} of 30 layers), batch {args.batch}, N = {args.n_thought}, K = {args.n_talk}, "
          f"P = {args.passes}, forward + backward, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}\n")
    print("| L | path | logits_chunk_elements | tensor peak MiB | RSS peak MiB | step wall ms | step CPU ms | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        full = next(r for r in rows if r["seq_len"] == row["seq_len"] and r["path"] == "full")
        ratio = "" if row is full else f" ({full['tensor_peak_mib'] / row['tensor_peak_mib']:.1f}x less)"
        chunk = "-" if row is full else f"{row['chunk']:,}"
        print(f"| {row['seq_len']} | {row['path']} | {chunk} | {row['tensor_peak_mib']:.0f}{ratio} | "
              f"{row['rss_peak_mib']:.0f} | {row['step_ms']:.0f} | {row['cpu_ms']:.0f} | {row['loss']:.6f} |")


if __name__ == "__main__":
    main()
