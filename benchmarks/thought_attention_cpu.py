"""quietstar_torch vs quietstar_reference (dense mask) on CPU: attention op and a full training step.

Table 1: forward+backward time and peak memory of the thought attention op, L in {256, 512, 1024},
S in {8, 14}, B = 1, H = 4, D = 64, fp32. Table 2: tokens/s of a whole Quiet-STaR training step of a
tiny Llama (N = 9, K = 4, P = 2, L = 256) on each path. Every case runs in a fresh subprocess, so
"peak" is that process's peak RSS above its RSS once the inputs exist.

    python benchmarks/thought_attention_cpu.py            # both tables
    python benchmarks/thought_attention_cpu.py --quick    # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

DENSE_BUDGET_BYTES = 12 * 2**30  # skip dense cases whose score/prob/grad tensors would exceed this


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_attention_case(path: str, L: int, S: int, repeats: int) -> dict:
    import torch

    from quietstar.ops import thought_attention_reference, thought_attention_torch

    op = {"torch": thought_attention_torch, "reference": thought_attention_reference}[path]
    torch.manual_seed(0)
    B, H, D, T = 1, 4, 64, (1 + S) * L
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    pad = torch.ones(B, L, dtype=torch.bool)
    grad = torch.randn(B, H, T, D)
    base_rss = _rss_bytes()
    times = []
    for _ in range(repeats + 1):  # first run warms up
        tic = time.perf_counter()
        out = op(q, k, v, base_len=L, key_padding_mask=pad)
        out.backward(grad)
        times.append(time.perf_counter() - tic)
        q.grad = k.grad = v.grad = None
        del out
    return {"seconds": min(times[1:]), "peak_bytes": _peak_rss_bytes() - base_rss}


def run_train_step_case(path: str, repeats: int, L: int = 256) -> dict:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quietstar import QuietStarForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=L + 64)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=9, n_talk_tokens=4, n_passes=2,
                                           attn_implementation=f"quietstar_{path}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 512, (2, L))
    base_rss = _rss_bytes()
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        out = model(batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tic)
    seconds = min(times[1:])
    return {"seconds": seconds, "tokens_per_s": batch.numel() / seconds, "peak_bytes": _peak_rss_bytes() - base_rss}


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def dense_bytes(L: int, S: int, H: int = 4) -> int:
    T = (1 + S) * L
    return 4 * H * T * T * 4  # scores, probabilities and their two gradients, fp32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process
        kind, path, *sizes = args.case.split(":")
        if kind == "attention":
            result = run_attention_case(path, int(sizes[0]), int(sizes[1]), args.repeats)
        else:
            result = run_train_step_case(path, args.repeats, int(sizes[0]))
        print(json.dumps(result))
        return

    import torch

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lengths = [64, 128] if args.quick else [256, 512, 1024]
    print("\n## Thought attention op, forward+backward, B=1 H=4 D=64 fp32\n")
    print("| L | S | torch time (s) | dense time (s) | time ratio | torch peak (MiB) | dense peak (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for L in lengths:
        for S in (8, 14):
            fast = _subprocess(["--case", f"attention:torch:{L}:{S}", "--repeats", str(args.repeats)])
            if dense_bytes(L, S) > DENSE_BUDGET_BYTES:
                dense = {"error": f"skipped: needs ~{dense_bytes(L, S) / 2**30:.0f} GiB"}
            else:
                dense = _subprocess(["--case", f"attention:reference:{L}:{S}", "--repeats", str(args.repeats)])
            row = [str(L), str(S), f"{fast['seconds']:.3f}" if "seconds" in fast else fast["error"]]
            if "seconds" in dense and "seconds" in fast:
                row += [f"{dense['seconds']:.3f}", f"{dense['seconds'] / fast['seconds']:.1f}x",
                        f"{fast['peak_bytes'] / 2**20:.0f}", f"{dense['peak_bytes'] / 2**20:.0f}",
                        f"{dense['peak_bytes'] / max(fast['peak_bytes'], 1):.1f}x"]
            else:
                row += [dense.get("error", "-"), "-", f"{fast.get('peak_bytes', 0) / 2**20:.0f}", "-", "-"]
            print("| " + " | ".join(row) + " |", flush=True)

    L = 64 if args.quick else 256
    print(f"\n## Full training step, tiny Llama (2 layers, hidden 128), N=9 K=4 P=2 B=2 L={L}\n")
    print("| path | step (s) | tokens/s | peak (MiB) |")
    print("|---|---|---|---|")
    results = {}
    for path in ("torch", "reference"):
        results[path] = r = _subprocess(["--case", f"train:{path}:{L}", "--repeats", str(args.repeats)])
        if "error" in r:
            print(f"| quietstar_{path} | {r['error']} | | |")
        else:
            print(f"| quietstar_{path} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} |")
    if all("tokens_per_s" in r for r in results.values()):
        ratio = results["torch"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
        print(f"\nquietstar_torch / quietstar_reference tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
