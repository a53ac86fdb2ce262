"""Every Triton kernel built for Hopper (sm_90) on this CPU, without a GPU: Triton ships ``ptxas``.

``triton_kernels.compile_check`` compiles each kernel as a launch on an H100 would (its signature
specialisation, the launcher's own configs) and reads ``ptxas -v``; it runs in a subprocess because
the kernels must be compiled, not interpreted (conftest.py sets ``TRITON_INTERPRET=1`` for this
process). Asserted per (kernel, dtype, head dim, config):

* it compiles;
* spilled bytes per thread <= SPILL_BOUND (8 B), except the few defaults listed in KNOWN_SPILLS with
  their own small bound -- configs that the H200 autotuner picked as fastest despite spilling;
* shared memory <= 232,448 B (the most one CTA may use on sm_90);
* 16-bit inputs: every dot of the tiled kernels is a wgmma (no mma.sync fallback).

Default (CI, 25-60 s on 2 shared cores): the no-autotune default config of every kernel, bf16 and
fp16, D = 64 and 128, with a padding mask; fp32's configs at D = 128. The ``slow`` test, run only
with ``QUIETSTAR_COMPILE_ALL=1``: every autotune candidate, with and without padding, fp32 at D = 64
too (1.5-3 min).
The register allocator differs between Triton releases: the figures were taken with Triton 3.9.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED_MEMORY = 232448
SPILL_BOUND = 8  # bytes per thread: two registers' worth (a few 128-row forward candidates spill 4-8 B)
# (kernel, D, config) -> bytes per thread: the H200 winners that still spill a little at D = 128
# (Triton 3.9: fwd 0-32, dK/dV 32, dQ 8-120); they stay the defaults because they were measured
# fastest, and each has spill-free autotune alternatives. dQ's extra-key loop holds q and dO upcast
# to fp32 beside the 128 x D fp32 accumulator.
KNOWN_SPILLS = {
    ("fwd", 128, (64, 64, 4, 3)): 64,
    ("dkdv", 128, (32, 64, 4, 3)): 64,
    ("dq", 128, (128, 64, 8, 2)): 128,
}
FULL = os.environ.get("QUIETSTAR_COMPILE_ALL") == "1"


def _ptxas_missing() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed"
    ptxas = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return f"this triton wheel ships no ptxas ({ptxas})"
    return None


pytestmark = pytest.mark.skipif(_ptxas_missing() is not None, reason=f"cannot compile for sm_90: {_ptxas_missing()}")


def _compile_all(runs: list[list[str]], tmp_path: Path) -> list[dict]:
    """Run ``python -m triton_kernels.compile_check --json ARGS`` for each ARGS, all at once (compiling
    is single-threaded: a few processes keep the CI machine's cores busy)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = []
    for start in range(0, len(runs), 3):
        procs = []
        for i, args in enumerate(runs[start:start + 3], start):
            env_i = dict(env, TRITON_CACHE_DIR=str(tmp_path / f"cache{i}"))  # fresh: ptxas must really run
            cmd = [sys.executable, "-m", "triton_kernels.compile_check", "--json", *args]
            procs.append((args, subprocess.Popen(cmd, cwd=ROOT, env=env_i, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)))
        for args, proc in procs:
            out, err = proc.communicate(timeout=1800)
            got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            assert got, f"compile_check {args} printed nothing (rc {proc.returncode}):\n{err[-3000:]}"
            rows += got
    return rows


def _check(rows: list[dict]) -> list[str]:
    problems = []
    for r in rows:
        cfg = tuple(r["config"])
        name = f"{r['kernel']} {r['dtype']} D={r['D']} pad={int(r['pad'])} config={cfg}"
        if "error" in r:
            problems.append(f"{name}: does not compile: {r['error'][:400]}")
            continue
        bound = KNOWN_SPILLS.get((r["kernel"], r["D"], cfg), SPILL_BOUND) if r["dtype"] != "fp32" else SPILL_BOUND
        if r["spill_stores"] > bound:
            problems.append(f"{name}: spills {r['spill_stores']} B per thread > {bound} B ({r['regs']} registers)")
        if r["smem"] > H100_SHARED_MEMORY:
            problems.append(f"{name}: {r['smem']} B of shared memory > {H100_SHARED_MEMORY} B")
        if r["dtype"] != "fp32" and r["kernel"] in ("fwd", "dkdv", "dq") and (r["wgmma"] == 0 or r["mma_sync"]):
            problems.append(f"{name}: 16-bit dots not all on wgmma ({r['wgmma']} wgmma, {r['mma_sync']} mma.sync)")
    return problems


def _compile_and_check(runs: list[list[str]], tmp_path: Path) -> None:
    rows = _compile_all(runs, tmp_path)
    # Every kernel was built at every (dtype, D): a kernel silently left out would pass vacuously.
    built = {(r["kernel"], r["dtype"], r["D"]) for r in rows}
    want = {(k, dt, d) for dt in ("bf16", "fp16") for d in (64, 128) for k in ("fwd", "dkdv", "dq", "pre", "xtra")}
    assert want <= built, f"not built: {sorted(want - built)}"
    problems = _check(rows)
    assert not problems, "\n".join(problems)


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The no-autotune defaults (16-bit, with padding) and fp32's configs at D = 128."""
    runs = [["--dtype", dt, "--dim", "64", "128"] for dt in ("bf16", "fp16")]
    runs.append(["--dtype", "fp32", "--dim", "128", "--kernel", "fwd", "dkdv", "dq"])
    _compile_and_check(runs, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="set QUIETSTAR_COMPILE_ALL=1 to build every autotune candidate (1.5-3 min)")
def test_every_autotune_candidate_compiles_for_sm90_without_spills(tmp_path):
    """Every candidate the autotuner may pick, with and without padding; fp32 at D = 64 and 128."""
    runs = [["--all", "--dtype", dt, "--dim", "64", "128", "--pad", "0", "1"] for dt in ("bf16", "fp16")]
    runs.append(["--dtype", "fp32", "--dim", "64", "128"])
    _compile_and_check(runs, tmp_path)


def test_checks_catch_a_spill_and_an_mma_sync_fallback():
    """The assertions themselves fail on the faults they look for (fabricated reports)."""
    good = dict(kernel="dq", dtype="bf16", D=64, pad=True, config=[128, 64, 8, 2], regs=200, spill_stores=0,
                smem=65536, wgmma=24, mma_sync=0)
    assert _check([good]) == []
    assert _check([dict(good, spill_stores=12)])
    assert _check([dict(good, D=128, spill_stores=120)]) == []  # a listed default within its bound
    assert _check([dict(good, D=128, spill_stores=400)])
    assert _check([dict(good, wgmma=0, mma_sync=96)])
    assert _check([dict(good, smem=H100_SHARED_MEMORY + 1)])
    assert _check([dict(good, error="CompilationError: boom")])
