"""The thought attention op, every path that computes it, forward and backward (GPU or CPU).

    python benchmarks/attention.py [--L 1024 2048 4096] [--S 8 16] [--heads 32] [--dim 128]   # CUDA
                                   [--csv out.csv] [--max-dense-mask-gib 4]
    python benchmarks/attention.py --cpu [--L 256 512 1024] [--S 8 14] [--repeats 3]          # CPU
    python benchmarks/attention.py --cpu --quick                                              # smoke run

**On CUDA**, for each (L, S), bf16, batch 1, H heads of dim D, forward and forward+backward, it times
(``triton.testing.do_bench``, median ms) and reports useful TFLOP/s -- counting only the (query, key)
entries the visibility rule allows, 4*D flops each forward and 2.5x that again for the backward --
for:

* ``quietstar_triton``  triton_kernels.thought_attention (this repo's fused kernel)
* ``quietstar_torch``   quietstar.ops.thought_attention_torch (the portable decomposition)
* ``flex``              torch.compile'd FlexAttention with the rule as ``mask_mod``
* ``sdpa_dense``        SDPA (memory-efficient backend) with a dense boolean mask, when it fits
* ``ceiling_causal``    SDPA's causal flash backend over a length with the same useful entry count:
                        what a dense-tile causal kernel achieves on the same work

Ratios are each path's time over quietstar_triton's (>1: the Triton kernel is faster).

**On CPU** (``--cpu``, or no GPU): ``quietstar_torch`` against ``quietstar_reference`` (the dense
mask), fp32, B 1, H 4, D 64 by default, forward + backward of the op, then a whole Quiet-STaR
training step (sampling, replay, losses, backward, AdamW) of a tiny Llama (hidden 128, 2 layers)
on each path, N 9, K 4, P 2, B 2. Every case runs in a fresh process, so its
peak is that process's peak RSS above its RSS once the inputs exist; time = median of the repeats
after a warm-up.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from quietstar.layout import is_visible, useful_entries  # noqa: E402


def attention_flops(entries: int, heads: int, head_dim: int, backward: bool) -> float:
    """2 matmuls x 2 flops per entry per head dim forward; the backward does 2.5x the forward."""
    forward = 4.0 * entries * heads * head_dim
    return forward * 3.5 if backward else forward


def _thought_mask_mod(base_len: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return is_visible(q_idx // base_len, q_idx % base_len, kv_idx // base_len, kv_idx % base_len)

    return mask_mod


def _time(fn, backward: bool, inputs, grad_out) -> float:
    import triton.testing

    if backward:
        def step():
            out = fn()
            torch.autograd.grad(out, inputs, grad_out)
    else:
        def step():
            with torch.no_grad():
                fn()
    return triton.testing.do_bench(step, warmup=25, rep=100)


def run(args) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    # One graph per (L, S) and per grad mode: stay under dynamo's recompile limit (8 by default), past
    # which later shapes would silently run eager flex attention (and run out of memory).
    import torch._dynamo

    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 4 * len(args.L) * len(args.S)))
    flex = torch.compile(flex_attention, dynamic=False)
    dev, dtype, B, H, D = "cuda", torch.bfloat16, 1, args.heads, args.dim
    rows = []
    for L in args.L:
        for S in args.S:
            nk = 1 + S
            T = nk * L
            entries = useful_entries(L, nk, batch=B)
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(B, H, T, D, device=dev, dtype=dtype)

            paths, skipped = _gpu_paths(q, k, v, L, flex, args.max_dense_mask_gib)
            # Causal flash attention over Tc tokens does Tc(Tc+1)/2 entries: pick Tc to match.
            Tc = round((math.sqrt(8 * entries / B + 1) - 1) / 2)
            qc, kc, vc = (torch.randn(B, H, Tc, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            gc = torch.randn(B, H, Tc, D, device=dev, dtype=dtype)

            def ceiling():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)

            _print_agreement(paths, (q, k, v), g, f"L={L} S={S} T={T}")
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                times = {}
                for name, fn in paths.items():
                    try:
                        times[name] = _time(fn, backward, (q, k, v), g)
                    except Exception as err:  # OOM or an unsupported backend: report, keep going
                        skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                    torch.cuda.empty_cache()
                times["ceiling_causal"] = _time(ceiling, backward, (qc, kc, vc), gc)
                for name in list(paths) + ["ceiling_causal"]:
                    n = Tc * (Tc + 1) // 2 * B if name == "ceiling_causal" else entries
                    ms = times.get(name)
                    rows.append({
                        "L": L, "S": S, "mode": mode, "path": name,
                        "ms": ms,
                        "tflops": attention_flops(n, H, D, backward) / (ms * 1e-3) / 1e12 if ms else None,
                        "ratio_vs_triton": ms / times["quietstar_triton"] if ms and "quietstar_triton" in times else None,
                        "note": skipped.get(name, ""),
                    })
            for name, why in skipped.items():
                print(f"  skipped {name}: {why}", flush=True)
            del q, k, v, g, qc, kc, vc, gc, paths
            torch.cuda.empty_cache()
    return rows


def _gpu_paths(q, k, v, L: int, flex, max_dense_mask_gib: float):
    """The attention paths timed at one point, and the ones skipped with why."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    import triton_kernels
    from quietstar.ops import thought_attention_torch

    T, dev = q.shape[2], q.device
    paths = {
        "quietstar_triton": lambda: triton_kernels.thought_attention(q, k, v, base_len=L),
        "quietstar_torch": lambda: thought_attention_torch(q, k, v, base_len=L),
    }
    skipped = {}
    block_mask = create_block_mask(_thought_mask_mod(L), None, None, T, T, device=dev)
    paths["flex"] = lambda: flex(q, k, v, block_mask=block_mask)
    mask_gib = T * T * (1 + 2) / 2**30  # the bool mask + the backend's bf16 bias copy
    if mask_gib <= max_dense_mask_gib:
        dense = is_visible(*(x for x in _grid_indices(T, L, dev)))[None, None]

        def sdpa_dense():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

        paths["sdpa_dense"] = sdpa_dense
    else:
        skipped["sdpa_dense"] = f"dense mask needs ~{mask_gib:.1f} GiB > --max-dense-mask-gib {max_dense_mask_gib}"
    return paths, skipped


def _print_agreement(paths, inputs, grad_out, where: str) -> None:
    """Sanity before timing: the two thought paths agree, forward and gradients (max error over the
    torch path's largest magnitude; bf16 rounds at ~4e-3 per operation)."""
    results = [(out, *torch.autograd.grad(out, inputs, grad_out))
               for out in (paths[name]() for name in ("quietstar_triton", "quietstar_torch"))]
    agreement = [f"{name} {((a.float() - b.float()).abs().max() / b.float().abs().max()).item():.1e}"
                 for name, a, b in zip(("out", "dq", "dk", "dv"), *results)]
    print(f"{where}: triton vs torch, max error / max |torch|: {', '.join(agreement)}", flush=True)


def _grid_indices(T: int, L: int, dev):
    qi = torch.arange(T, device=dev)[:, None]
    ki = torch.arange(T, device=dev)[None, :]
    return qi // L, qi % L, ki // L, ki % L


def print_table(rows: list[dict]) -> None:
    print(f"\n{'L':>5} {'S':>3} {'mode':>8} {'path':>17} {'ms':>9} {'TFLOP/s':>8} {'x triton':>9}  note")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        ratio = f"{r['ratio_vs_triton']:.2f}" if r["ratio_vs_triton"] else "-"
        print(f"{r['L']:>5} {r['S']:>3} {r['mode']:>8} {r['path']:>17} {ms:>9} {tf:>8} {ratio:>9}  {r['note']}")


# ---------------------------------------------------------------- CPU: quietstar_torch vs the dense reference

DENSE_BUDGET_MIB = 12 * 1024  # skip dense cases whose score/prob/grad tensors would exceed this


def dense_mib(L: int, S: int, H: int) -> float:
    T = (1 + S) * L
    return 4 * H * T * T * 4 / harness.MIB  # scores, probabilities and their two gradients, fp32


def cpu_op_case(path: str, L: int, S: int, H: int, D: int, repeats: int, queue) -> None:
    from quietstar.ops import thought_attention_reference, thought_attention_torch

    op = {"torch": thought_attention_torch, "reference": thought_attention_reference}[path]
    torch.manual_seed(0)
    T = (1 + S) * L
    q, k, v = (torch.randn(1, H, T, D, requires_grad=True) for _ in range(3))
    pad = torch.ones(1, L, dtype=torch.bool)
    grad = torch.randn(1, H, T, D)
    start_mib = harness.rss_mib()

    def step():
        op(q, k, v, base_len=L, key_padding_mask=pad).backward(grad)
        q.grad = k.grad = v.grad = None

    timing = harness.time_steps(step, repeats)
    queue.put({"ms": timing.wall_ms, "peak_mib": harness.peak_rss_mib() - start_mib})


def cpu_step_case(path: str, L: int, repeats: int, queue) -> None:
    from quietstar import QuietStarForCausalLM

    base = harness.random_base("tiny-llama", hidden_size=128, intermediate_size=256, num_key_value_heads=4,
                               max_position_embeddings=L + 64)
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=9, n_talk_tokens=4, n_passes=2,
                                           attn_implementation=f"quietstar_{path}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 512, (2, L))
    start_mib = harness.rss_mib()

    def step():
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = harness.time_steps(step, repeats)
    queue.put({"ms": timing.wall_ms, "tokens_per_s": batch.numel() / timing.wall_ms * 1e3,
               "peak_mib": harness.peak_rss_mib() - start_mib})


def main_cpu(args) -> None:
    L_values = args.L or ([64, 128] if args.quick else [256, 512, 1024])
    S_values, H, D = args.S or [8, 14], args.heads or 4, args.dim or 64
    print(harness.machine_stamp(torch.get_num_threads()))
    print(f"\n## Thought attention op, forward+backward, B=1 H={H} D={D} fp32\n")
    print("| L | S | torch ms | dense ms | time ratio | torch peak MiB | dense peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for L in L_values:
        for S in S_values:
            fast = harness.in_fresh_process(cpu_op_case, ("torch", L, S, H, D, args.repeats), f"torch L={L} S={S}")
            if dense_mib(L, S, H) > DENSE_BUDGET_MIB:
                print(f"| {L} | {S} | {fast['ms']:.1f} | skipped: needs ~{dense_mib(L, S, H) / 1024:.0f} GiB | - | "
                      f"{fast['peak_mib']:.0f} | - | - |", flush=True)
                continue
            dense = harness.in_fresh_process(cpu_op_case, ("reference", L, S, H, D, args.repeats), f"dense L={L} S={S}")
            print(f"| {L} | {S} | {fast['ms']:.1f} | {dense['ms']:.1f} | {dense['ms'] / fast['ms']:.1f}x | "
                  f"{fast['peak_mib']:.0f} | {dense['peak_mib']:.0f} | "
                  f"{dense['peak_mib'] / max(fast['peak_mib'], 1):.1f}x |", flush=True)
    L = 64 if args.quick else 256
    print(f"\n## Full training step, tiny Llama (2 layers, hidden 128), N=9 K=4 P=2 B=2 L={L}\n")
    print("| path | step ms | tokens/s | peak MiB |")
    print("|---|---|---|---|")
    results = {}
    for path in ("torch", "reference"):
        results[path] = r = harness.in_fresh_process(cpu_step_case, (path, L, args.repeats), f"{path} step")
        print(f"| quietstar_{path} | {r['ms']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} |", flush=True)
    ratio = results["torch"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    print(f"\nquietstar_torch / quietstar_reference tokens/s: {ratio:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison (the default without a GPU)")
    parser.add_argument("--L", type=int, nargs="+", default=None, help="CUDA: 1024 2048 4096; CPU: 256 512 1024")
    parser.add_argument("--S", type=int, nargs="+", default=None, help="CUDA: 8 16; CPU: 8 14")
    parser.add_argument("--heads", type=int, default=None, help="CUDA: 32; CPU: 4")
    parser.add_argument("--dim", type=int, default=None, help="CUDA: 128; CPU: 64")
    parser.add_argument("--max-dense-mask-gib", type=float, default=4.0, help="CUDA: skip the dense SDPA path above it")
    parser.add_argument("--csv", type=Path, default=None, help="CUDA: write the rows here")
    parser.add_argument("--repeats", type=int, default=2, help="CPU: timed repeats per case")
    parser.add_argument("--quick", action="store_true", help="CPU: L 64 128 and a step at L 64, for a smoke run")
    args = parser.parse_args(argv)
    if args.cpu or not torch.cuda.is_available():
        return main_cpu(args)
    ok, why = __import__("triton_kernels").is_available()
    if not ok:
        sys.exit(f"triton kernels unavailable: {why}")
    args.L, args.S = args.L or [1024, 2048, 4096], args.S or [8, 16]
    args.heads, args.dim = args.heads or 32, args.dim or 128
    print(f"{harness.machine_stamp()}\nbf16  B=1 H={args.heads} D={args.dim}")
    rows = run(args)
    print_table(rows)
    if args.csv:
        import csv

        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
