"""Compile the thought-attention kernels ahead of time for a GPU that is not here, and report what
decides whether they run well on it: registers, spilled bytes, shared memory, tensor-core use.

Triton ships ``ptxas``, so a CPU-only machine can build every kernel for Hopper (``sm_90a``) exactly
as a launch on an H100 would (same signature specialisation: unit last-dim strides are constants,
pointers and strides 16-aligned) and read ``ptxas -v``'s report. The configs are the launcher's own
(``attention._configs`` / ``attention._elementwise_block``), so what is checked is what can run.

    python -m triton_kernels.compile_check                 # fast subset: each kernel's default config
    python -m triton_kernels.compile_check --all --json    # every config the launcher can pick

Run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled); each call compiles
into a fresh cache directory so that ptxas really runs (a cache hit would report nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _signature(fn, ptr_types: dict, constexprs: dict):
    """What a real launch on contiguous [B, T, H, D]-style tensors specialises to."""
    sig, cx, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride_") and name.endswith("d") and name != "stride_pb":
            cx[name] = 1  # unit stride of the head dim: Triton specialises an int argument equal to 1
            sig[name] = "constexpr"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def jobs(dtypes=("bf16", "fp16"), dims=(64, 128), all_configs=False, pads=(True,), arch="hopper"):
    """(kernel, dtype, D, has_pad, (BLOCK_M, BLOCK_N, warps, stages)) for the launcher's configs.

    The tiled kernels take every candidate with ``all_configs`` (autotuning may pick any), else the
    default (first) one; the elementwise ones have a single config. ``BLOCK_M``/``BLOCK_N`` of the
    elementwise kernels is their row count (the other entry 0)."""
    from .attention import _configs, _elementwise_block

    out = []
    for dt in dtypes:
        for d in dims:
            for pad in pads:
                for kernel in ("fwd", "dkdv", "dq"):
                    cands = _configs(kernel, arch, d, TORCH_DTYPES[dt])
                    for cfg in cands if all_configs else cands[:1]:
                        out.append((kernel, dt, d, pad, cfg))
                rows, warps = _elementwise_block(arch, d, TORCH_DTYPES[dt])
                out.append(("pre", dt, d, pad, (rows, 0, warps, 1)))
                out.append(("xtra", dt, d, pad, (0, rows, warps, 1)))
    return out


def compile_one(kernel: str, dt: str, d: int, has_pad: bool, cfg, capability: int = 90) -> dict:
    """Compile one kernel for ``cuda:<capability>``; return its resource report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from . import _attention_kernels as K
    from .attention import _dot_precision

    m, n, warps, stages = cfg
    P = f"*{dt}"
    pad_t = "*u8" if has_pad else P
    prec = _dot_precision(TORCH_DTYPES[dt])
    common = dict(HEAD_DIM=d, HAS_PAD=has_pad)
    fn, ptrs, consts = {
        "fwd": (K._attn_fwd, dict(Q=P, K=P, V=P, PAD=pad_t, Out=P, Lse="*fp32"),
                dict(common, BLOCK_M=m, BLOCK_N=n, DOT_PRECISION=prec)),
        "dkdv": (K._attn_bwd_dkdv_base, dict(Q=P, K=P, V=P, PAD=pad_t, DOut=P, Lse="*fp32", Delta="*fp32", DK=P, DV=P),
                 dict(common, BLOCK_M=m, BLOCK_N=n, DOT_PRECISION=prec)),
        "dq": (K._attn_bwd_dq, dict(Q=P, K=P, V=P, PAD=pad_t, DOut=P, Lse="*fp32", Delta="*fp32", DQ=P),
               dict(common, BLOCK_M=m, BLOCK_N=n, DOT_PRECISION=prec)),
        "pre": (K._bwd_preprocess, dict(Out=P, DOut=P, DLse="*fp32", Delta="*fp32"),
                dict(HEAD_DIM=d, BLOCK_M=m, HAS_DLSE=has_pad)),  # no padding input: pad=1 means "with dLSE"
        "xtra": (K._attn_bwd_dkdv_extra, dict(Q=P, K=P, V=P, PAD=pad_t, DOut=P, Lse="*fp32", Delta="*fp32", DK=P, DV=P),
                 dict(common, BLOCK_N=n)),
    }[kernel]
    sig, cx, attrs = _signature(fn, ptrs, consts)
    target = GPUTarget("cuda", capability, 32)
    options = make_backend(target).parse_options({"num_warps": warps, "num_stages": stages}).__dict__
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v's report goes to stdout
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), target=target,
                                  options=options)
    seconds = time.perf_counter() - t0
    report = log.getvalue()
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    stack = re.search(r"(\d+) bytes stack frame", report)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas -v report for {kernel} (cache hit? set a fresh TRITON_CACHE_DIR):\n{report}")
    ptx = compiled.asm["ptx"]
    return dict(kernel=kernel, dtype=dt, D=d, pad=has_pad, config=list(cfg), seconds=round(seconds, 2),
                regs=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
                stack=int(stack.group(1)) if stack else 0, smem=int(compiled.metadata.shared),
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=len(re.findall(r"\bmma\.sync", ptx)))


def _fmt(r: dict) -> str:
    m, n, w, s = r["config"]
    cfg = f"({m},{n},w{w},s{s})" if r["kernel"] in ("fwd", "dkdv", "dq") else f"(rows {m or n},w{w})"
    return (f"| {r['kernel']:5s} | {r['dtype']} | {r['D']:3d} | {int(r['pad'])} | {cfg:16s} | {r['regs']:3d} | "
            f"{r['spill_stores']:5d} | {r['smem']:6d} | {r['wgmma']:4d} | {r['mma_sync']:3d} | {r['seconds']:5.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every config the launcher can pick, not just defaults")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--dim", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--pad", nargs="+", type=int, default=[1], choices=[0, 1])
    ap.add_argument("--kernel", nargs="+", default=["fwd", "dkdv", "dq", "pre", "xtra"])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton < 3.9 fuses; keep what the GPUs run
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_sm90_"))
    if not args.json:
        print("| kernel | dtype | D | pad | config | regs | spill B | smem B | wgmma | mma.sync | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for job in jobs(tuple(args.dtype), tuple(args.dim), args.all, tuple(bool(p) for p in args.pad)):
        if job[0] not in args.kernel:
            continue
        try:
            r = compile_one(*job)
        except Exception as err:  # noqa: BLE001 -- report and go on to the next kernel
            failed += 1
            r = dict(kernel=job[0], dtype=job[1], D=job[2], pad=job[3], config=list(job[4]),
                     error=f"{type(err).__name__}: {str(err)[:2000]}")
            print(json.dumps(r) if args.json else f"{job}: COMPILE FAILED {r['error'][:300]}", flush=True)
            continue
        print(json.dumps(r) if args.json else _fmt(r), flush=True)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
