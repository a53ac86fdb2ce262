"""Replay or incremental (issue 10): the two thought forwards of a training step, side by side in one process.

    PYTHONPATH=. python benchmarks/thought_forward.py --lengths 256,512,1024          # CPU: the tiny Mistral
    python benchmarks/thought_forward.py --model smollm2-shape --attn quietstar_triton --batch 4   # a GPU

``thought_forward="replay"`` (DESIGN.md section 4) samples the thoughts without grad, one cached call
per step, then feeds all ``(1+S) L`` tokens again with grad in one call. ``"incremental"`` samples
with grad into the KV cache and feeds only ``t_N``, eot and the ``K - 1`` fed-back tokens after it:
``N + 1`` steps fewer fed, but ``N + 2`` calls in forward and backward instead of one.

A step is forward (memory-light, as the training loop runs it) + backward, no optimiser. The two
designs run in alternating rounds inside ONE process (machine load hits both alike) with the same
generator seed, so they sample the same thoughts and their losses must agree (printed). Columns:
median step, speed-up of incremental over replay, and from one more step of each (untimed):
bytes saved for backward (every distinct storage autograd keeps, by a saved-tensor hook; the same
count on CPU and GPU) and on CUDA the peak allocated above the model and its gradients. Models: ``tiny-mistral`` (step_vs_length.py's
issue-10 model, fp32; the CPU default) or ``smollm2-shape`` (SmolLM2-135M's architecture, random
weights, bf16 autocast on CUDA; the GPU default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_vs_length  # noqa: E402
import train_throughput  # noqa: E402

DESIGNS = ("replay", "incremental")


def build(model_name: str, args):
    from quietstar import QuietStarForCausalLM

    torch.manual_seed(0)
    if model_name == "tiny-mistral":
        model = step_vs_length.build_model("quietstar")
        model.set_attn_implementation(args.attn)
    else:
        model = QuietStarForCausalLM.from_base(train_throughput.smollm2_shape_random(), n_thought_tokens=args.n_thought,
                                               n_talk_tokens=args.n_talk, n_passes=args.passes, attn_implementation=args.attn)
    return model.train()


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while the context is open."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--model", default=None, help="tiny-mistral (CPU default) or smollm2-shape (CUDA default)")
    parser.add_argument("--attn", default=None, help="quietstar_torch (CPU default) or quietstar_triton (CUDA default)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n-thought", type=int, default=9, help="N (smollm2-shape; tiny-mistral is N 9 K 4 P 2)")
    parser.add_argument("--n-talk", type=int, default=4, help="K")
    parser.add_argument("--passes", type=int, default=2, help="P")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.model = args.model or ("smollm2-shape" if cuda else "tiny-mistral")
    args.attn = args.attn or ("quietstar_triton" if cuda else "quietstar_torch")
    torch.set_num_threads(args.threads)
    model = build(args.model, args).to(device)
    vocab = model.get_input_embeddings().num_embeddings - 2  # below the two delimiter rows
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    cfg = model.config
    where = torch.cuda.get_device_name() if cuda else f"{step_vs_length.machine()}; torch threads {args.threads}"
    print(f"Machine: {where}; torch {torch.__version__}; model {args.model}, {args.attn}, "
          f"{'bf16 autocast' if cuda else 'fp32'}; B {args.batch}, N {cfg.n_thought_tokens}, K {cfg.n_talk_tokens}, "
          f"P {cfg.n_passes}; {args.rounds} alternating rounds\n")
    print("| L | design | median step s | speed-up vs replay | saved for backward MiB | CUDA peak above weights MiB | loss |")
    print("|---|---|---|---|---|---|---|")
    for L in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, vocab, (args.batch, L), generator=torch.Generator().manual_seed(1)).to(device)

        def step(design):
            cfg.thought_forward = design
            generator = torch.Generator(device=device).manual_seed(2)
            with autocast:
                out = model(ids, labels=ids, generator=generator, return_logits=False)
            out.loss.backward()
            return out.loss.item()

        for design in DESIGNS:  # warm-up (autotuning, allocator), then the weights' gradients exist
            step(design)
        saved, peak, loss = {}, {}, {}
        for design in DESIGNS:  # memory: one step each, the hook on (it is not timed)
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with SavedBytes() as counter:
                loss[design] = step(design)
            saved[design] = counter.mib
            if cuda:
                peak[design] = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = {d: [] for d in DESIGNS}
        for _ in range(args.rounds):
            for design in DESIGNS:
                t0 = time.perf_counter()
                step(design)  # .item() synchronises
                times[design].append(time.perf_counter() - t0)
        replay = statistics.median(times["replay"])
        for design in DESIGNS:
            median = statistics.median(times[design])
            cuda_peak = f"{peak[design]:.0f}" if cuda else "-"
            print(f"| {L} | {design} | {median:.3f} | {replay / median:.2f}x | {saved[design]:.0f} | {cuda_peak} | "
                  f"{loss[design]:.5f} |", flush=True)


if __name__ == "__main__":
    main()
