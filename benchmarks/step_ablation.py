"""Each issue-10 speed change on its own, in one process: the full training step under four settings.

    PYTHONPATH=. python benchmarks/step_ablation.py --lengths 256,512 --rounds 3

Settings, cumulative (the last is the shipped code): the issue's starting point (chunked torch path
with 16M-element chunks, ``torch.multinomial``), 2M-element chunks, the CPU flash-attention path
(quietstar/ops/cpu_flash.py), Gumbel-max thought sampling. The settings are switched inside ONE
process and run in alternating rounds, so a change of machine load hits all of them alike; the
table gives the median step of each and its speed-up over the first. Model and step as in
``step_vs_length.py`` (tiny Mistral, N = 9, K = 4, P = 2, batch 1, fp32, forward + backward).
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

import quietstar.ops.torch_path as torch_path  # noqa: E402
import quietstar.sampling as sampling  # noqa: E402

gumbel_pick = sampling.pick_tokens


def multinomial_pick(logits, temperature, banned_ids, generator=None):
    """pick_tokens as it was before issue 10 (same distribution, slower)."""
    logits = sampling.ban_tokens(logits.float(), banned_ids)
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


SETTINGS = {  # name: (USE_CPU_FLASH, _CHUNK_SCORE_ELEMENTS, pick_tokens)
    "chunked 16M + multinomial (before)": (False, 1 << 24, multinomial_pick),
    "chunked 2M + multinomial": (False, 1 << 21, multinomial_pick),
    "cpu flash + multinomial": (True, 1 << 21, multinomial_pick),
    "cpu flash + Gumbel-max (shipped)": (True, 1 << 21, gumbel_pick),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = step_vs_length.build_model("quietstar")
    print(f"Machine: {step_vs_length.machine()}; torch threads {args.threads}; {args.rounds} alternating rounds\n")
    print("| L | setting | median step s | speed-up vs before | load (1 min) |")
    print("|---|---|---|---|---|")
    for L in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, step_vs_length.VOCAB, (1, L), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)

        def step():
            out = model(ids, attention_mask=mask, labels=ids, generator=torch.Generator().manual_seed(2))
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up
        times = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, (flash, chunk, pick) in SETTINGS.items():
                torch_path.USE_CPU_FLASH, torch_path._CHUNK_SCORE_ELEMENTS, sampling.pick_tokens = flash, chunk, pick
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        before = statistics.median(next(iter(times.values())))
        for name, ts in times.items():
            median = statistics.median(ts)
            print(f"| {L} | {name} | {median:.3f} | {before / median:.2f}x | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
