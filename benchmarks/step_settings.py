"""One training step under alternative settings, side by side in one process (alternating rounds).

    PYTHONPATH=. python benchmarks/step_settings.py --compare ablation --lengths 256,512     # CPU speed changes
    python benchmarks/step_settings.py --compare chunks --lengths 1024 --budgets 21,24,26    # GPU: chunk budget
    python benchmarks/step_settings.py --compare thought-forward --lengths 256,512,1024      # replay vs incremental
    python benchmarks/step_settings.py --compare thought-forward --model smollm2-shape --batch 4   # a GPU

The settings switch inside ONE process, round after round, so a change of machine load hits all of
them alike (harness.alternating_rounds); every row gives the median step and its speed-up over the
first setting, then, from one more untimed step of each: the bytes autograd saves for backward
(every distinct storage, by a saved-tensor hook; the same count on CPU and GPU), on CUDA the peak
allocated above the step's start, and the loss. A step is forward (memory-light, as the training
loop runs it) + backward, no optimiser. Comparisons:

* ``ablation``: the CPU speed changes one by one, cumulative (the last is the shipped code): chunked
  torch path with 16M-element chunks and ``torch.multinomial`` sampling; 2M-element chunks; the CPU
  flash-attention path (quietstar/ops/cpu_flash.py); Gumbel-max sampling. Full step (thoughts sampled).
* ``chunks``: ``quietstar_torch``'s chunked path (the CPU flash path off) at each ``--budgets`` (log2
  of the score elements per chunk); given thoughts, so only the replay's forward + backward.
* ``thought-forward``: ``thought_forward="replay"`` (DESIGN.md section 4: sample without grad, one
  cached call per step, then feed all ``(1+S) L`` tokens again with grad) against ``"incremental"``
  (sample with grad into the KV cache, feed only ``t_N``, eot and the ``K - 1`` fed-back tokens:
  ``N + 1`` steps fewer fed, ``N + 2`` calls instead of one). Same generator seed: the same thoughts,
  so the losses must agree.

Models (harness.MODEL_CONFIGS): ``tiny-mistral`` (fp32; the CPU default), ``tiny-llama`` (head dim
128; the ``chunks`` default), ``smollm2-shape`` (SmolLM2-135M's architecture; the GPU default of
``thought-forward``). On CUDA the step runs under bf16 autocast.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import quietstar.ops.torch_path as torch_path  # noqa: E402
import quietstar.sampling as sampling  # noqa: E402

gumbel_pick = sampling.pick_tokens


def multinomial_pick(logits, temperature, banned_ids, generator=None):
    """pick_tokens before Gumbel-max (the same distribution, slower)."""
    logits = sampling.ban_tokens(logits.float(), banned_ids)
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


def set_chunks(log2_elements: int) -> None:
    torch_path._CHUNK_SCORE_ELEMENTS = torch_path._CHUNK_SCORE_ELEMENTS_ACCELERATOR = 1 << log2_elements


def settings_of(args, model) -> dict:
    """name -> a callable that switches the process to that setting."""
    if args.compare == "ablation":
        def ablation(flash, chunk, pick):
            def apply():
                torch_path.USE_CPU_FLASH, torch_path._CHUNK_SCORE_ELEMENTS, sampling.pick_tokens = flash, chunk, pick
            return apply

        return {"chunked 16M + multinomial (before)": ablation(False, 1 << 24, multinomial_pick),
                "chunked 2M + multinomial": ablation(False, 1 << 21, multinomial_pick),
                "cpu flash + multinomial": ablation(True, 1 << 21, multinomial_pick),
                "cpu flash + Gumbel-max (shipped)": ablation(True, 1 << 21, gumbel_pick)}
    if args.compare == "chunks":
        torch_path.USE_CPU_FLASH = False  # measure the chunked path on CPU too
        return {f"2^{b} score elements per chunk": (lambda b=b: set_chunks(b)) for b in args.budgets}
    return {design: (lambda design=design: setattr(model.config, "thought_forward", design))
            for design in ("replay", "incremental")}


def build(args, device):
    from quietstar import QuietStarForCausalLM

    default = {"ablation": "tiny-mistral", "chunks": "tiny-llama"}.get(args.compare)
    args.model = args.model or default or ("smollm2-shape" if device.type == "cuda" else "tiny-mistral")
    args.attn = args.attn or ("quietstar_triton" if device.type == "cuda" and args.compare == "thought-forward"
                              else "quietstar_torch")
    shape = dict(n_thought_tokens=9, n_talk_tokens=4) if args.model == "tiny-mistral" else \
        dict(n_thought_tokens=args.n_thought, n_talk_tokens=args.n_talk)
    model = QuietStarForCausalLM.from_base(harness.random_base(args.model), n_passes=args.passes,
                                           attn_implementation=args.attn, **shape)
    return model.to(device).train()


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
        return sum(self.storages.values()) / harness.MIB


def memory_of(step, cuda: bool) -> tuple[float, float | None, float]:
    """(saved for backward MiB, CUDA peak above the start MiB or None, loss) of one untimed step."""
    if cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with SavedBytes() as counter:
        loss = step()
    return counter.mib, harness.cuda_peak_mib(start) if cuda else None, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("ablation", "chunks", "thought-forward"), default="thought-forward")
    parser.add_argument("--lengths", default="256,512")
    parser.add_argument("--budgets", default="21,24,26", help="chunks: log2 of the score elements per chunk")
    parser.add_argument("--model", default=None, choices=list(harness.MODEL_CONFIGS), help="default: see the docstring")
    parser.add_argument("--attn", default=None, help="default quietstar_torch (quietstar_triton for thought-forward on CUDA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n-thought", type=int, default=9, help="N (tiny-mistral is always N 9 K 4)")
    parser.add_argument("--n-talk", type=int, default=4, help="K")
    parser.add_argument("--passes", type=int, default=2, help="P")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    model = build(args, device)
    settings = settings_of(args, model)
    vocab = model.get_input_embeddings().num_embeddings - 2  # below the two delimiter rows
    cfg = model.config
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    print(f"{harness.machine_stamp(args.threads)}\nCompare {args.compare}: model {args.model}, {args.attn}, "
          f"{'bf16 autocast' if cuda else 'fp32'}; B {args.batch}, N {cfg.n_thought_tokens}, K {cfg.n_talk_tokens}, "
          f"P {cfg.n_passes}; {args.rounds} alternating rounds after a warm-up\n")
    print("| L | setting | median step ms | speed-up vs first | saved for backward MiB | CUDA peak above start MiB "
          "| loss | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for L in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (args.batch, L), generator=g).to(device)
        given = args.compare == "chunks"
        thoughts = torch.randint(0, vocab, (args.batch * cfg.n_passes, L, cfg.n_thought_tokens), generator=g).to(device)

        def step():
            generator = torch.Generator(device=device).manual_seed(2)
            with autocast:
                out = model(ids, labels=ids, generator=generator, return_logits=False,
                            thought_ids=thoughts if given else None)
            out.loss.backward()
            model.zero_grad(set_to_none=False)  # kept allocated: the CUDA peak is above weights and gradients
            return out.loss.item()  # .item() synchronises

        def run(apply):
            apply()
            return step()

        runs = {name: (lambda apply=apply: run(apply)) for name, apply in settings.items()}
        for warm_up in runs.values():  # autotuning, the allocator; then the gradients exist
            warm_up()
        memory = {name: memory_of(runs[name], cuda) for name in runs}
        times = harness.alternating_rounds(runs, args.rounds, warmup=0)
        first = next(iter(times.values())).wall_ms
        for name, timing in times.items():
            saved, peak, loss = memory[name]
            print(f"| {L} | {name} | {timing.wall_ms:.1f} | {first / timing.wall_ms:.2f}x | {saved:.0f} | "
                  f"{'-' if peak is None else f'{peak:.0f}'} | {loss:.5f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
