"""Training step vs sequence length: a Quiet-STaR step against a plain step of the same model.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/step_vs_length.py                  # L = 64..1024
    python benchmarks/step_vs_length.py --lengths 256 --steps 3                       # one point
    python benchmarks/step_vs_length.py --tree base=/path/to/old/checkout --tree new=.  # before/after
    python benchmarks/step_vs_length.py --official /tmp/official-deps:/tmp/official-stubs  # + the official code

The model is harness.py's ``tiny-mistral`` (hidden 256, 2 layers, 4 heads, vocab 514, random weights,
sliding window off); Quiet-STaR with N = 9, K = 4, P = 2 (S = N + K + 1 = 14), batch 1, fp32. A
step is forward + backward (no optimiser). Every (tree, L, kind) point runs
in its own fresh process (``--repeats`` of them; the median over processes of each process's median
step), so its peak RSS (``ru_maxrss``) is that step's alone; the process imports ``quietstar`` from
the tree it is given (``PYTHONPATH``), which is how one run compares two checkouts on one machine
under the same load. Kinds:

* ``plain``: the base model alone (SDPA attention), ``labels = input_ids``;
* ``quietstar``: the full step (no-grad thought sampling, then the replay with grad, losses);
* ``incremental``: the full step with ``thought_forward="incremental"`` (sampling with grad into the
  KV cache, no replay; ``step_settings.py --compare thought-forward`` compares the two in one process);
* ``given``: the same step with the thoughts given (``thought_ids=``), i.e. without the sampling
  pass: an upper bound on what removing the sampling pass's cost could gain;
* ``official`` (with ``--official PYTHONPATH``): the official code's step on the same model shape,
  run by ``benchmarks/official_step.py`` from a transformers 4.37 install outside the repository.

FLOP model (``flop_ratio``; element-wise work, the mixing head and norms left out). With ``M`` the
matmul FLOPs of one token through the decoder layers (2 x their weights), ``A = 4 x hidden x layers``
FLOPs per visible (query, key) pair (``QK^T`` and ``PV``), ``E(L, nk, nq)`` the visible pairs
(``quietstar.layout.useful_entries``), ``h = 2 x hidden x V`` per LM-head row, and backward = 2 x
forward::

    plain    = 3 [M L + A E(L, 1, 1) + h L]
    replay   = 3 P [M (1+S) L + A E(L, 1+S, 1+S) + h (1 + K + N) L]       rows: base, talk, thought log-probs
    sampling =   P [M (N+1) L + A sum_{s=0..N} E(L, s+1, 1) + h N L]     no grad: N+1 cached calls
    flop_ratio = (replay + sampling) / plain
    incremental = replay + P h N L                                        no step fed twice
    official = 3 P sum_{i=0..N+K+1} [M L + A L (i+1) L + h L]             15 dense forwards with grad
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

N_THOUGHT, N_TALK, N_PASSES = 9, 4, 2
_, _TINY = harness.MODEL_CONFIGS["tiny-mistral"]
HIDDEN, LAYERS, HEADS, VOCAB, INTERMEDIATE = (_TINY[k] for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "vocab_size", "intermediate_size"))


def build_model(kind: str):
    base = harness.random_base("tiny-mistral", attn_implementation="sdpa")
    if kind == "plain":
        return base.train()
    from quietstar import QuietStarForCausalLM

    return QuietStarForCausalLM.from_base(base, n_thought_tokens=N_THOUGHT, n_talk_tokens=N_TALK,
                                          n_passes=N_PASSES).train()


def worker(spec: dict) -> dict:
    """One fresh process: build, warm up once, time ``steps`` steps; median step ms and peak RSS MiB."""
    import torch

    torch.set_num_threads(spec["threads"])
    model = build_model(spec["kind"])
    if spec["kind"] == "incremental":
        model.config.thought_forward = "incremental"
    L = spec["length"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, L), generator=g)
    mask = torch.ones_like(ids)
    thoughts = torch.randint(0, VOCAB, (1, L, N_THOUGHT), generator=g) if spec["kind"] == "given" else None
    sampler = torch.Generator().manual_seed(2)

    def step():
        if spec["kind"] == "plain":
            loss = model(ids, attention_mask=mask, labels=ids).loss
        else:
            loss = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts, generator=sampler).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    timing = harness.time_steps(step, spec["steps"])
    import quietstar

    return dict(step_ms=timing.wall_ms, peak_mib=harness.peak_rss_mib(), loss=timing.result,
                quietstar_file=quietstar.__file__)


def step_flops(L: int) -> dict:
    """FLOPs of one step of each kind (the model in the module docstring)."""
    from quietstar.layout import useful_entries

    N, K, P, S = N_THOUGHT, N_TALK, N_PASSES, N_THOUGHT + N_TALK + 1
    M = 2 * LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)  # q, k, v, o and the gated MLP
    A, h = 4 * HIDDEN * LAYERS, 2 * HIDDEN * VOCAB
    plain = 3 * (M * L + A * useful_entries(L, 1) + h * L)
    replay = 3 * P * (M * (1 + S) * L + A * useful_entries(L, 1 + S) + h * (1 + K + N) * L)
    sampling = P * (M * (N + 1) * L + A * sum(useful_entries(L, s + 1, 1) for s in range(N + 1)) + h * N * L)
    # The official step: n_ahead + n_ahead_talk - 1 = 15 forwards with grad of L new tokens each, every
    # one over all (i + 1) L keys so far with a dense mask (computed, masked or not), logits every time.
    official = 3 * P * sum(M * L + A * L * (i + 1) * L + h * L for i in range(N + 3 + K - 1))
    return dict(plain=plain, quietstar=replay + sampling, incremental=replay + P * h * N * L, official=official)


def flop_ratio(L: int) -> float:
    flops = step_flops(L)
    return flops["quietstar"] / flops["plain"]


def run_point(tree: str, kind: str, length: int, args) -> dict:
    """``tree`` is the PYTHONPATH of the worker: a checkout of this project, or the official install."""
    official = kind == "official"
    pythonpath = tree if official else os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    script = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_step.py")] if official else [__file__, "--worker"]
    results = []
    for _ in range(args.repeats):
        spec = dict(kind=kind, length=length, steps=args.steps, threads=args.threads)
        proc = subprocess.run([sys.executable, *script, json.dumps(spec)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} at L={length} from {tree} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if not official and not result["quietstar_file"].startswith(os.path.abspath(tree)):
            raise SystemExit(f"worker imported {result['quietstar_file']}, not the tree {tree}: check PYTHONPATH")
        results.append(result)
    return dict(step_ms=statistics.median(r["step_ms"] for r in results),
                peak_mib=statistics.median(r["peak_mib"] for r in results),
                loss=results[0]["loss"], load=os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="64,128,256,512,1024")
    parser.add_argument("--tree", action="append", help="NAME=PATH of a checkout to import quietstar from (repeatable)")
    parser.add_argument("--kinds", default="plain,quietstar,given")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per point")
    parser.add_argument("--official", help="PYTHONPATH of the official code's install (official_step.py); omit to skip it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: with 2 threads a loaded machine makes OpenMP stall, 8x slower here)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    trees = dict(t.split("=", 1) for t in (args.tree or [f"this={harness.REPO}"]))
    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = args.kinds.split(",")
    load_before = harness.load_average()
    rows = {}
    for L in lengths:  # trees interleaved per point, so a change of load hits both alike
        if args.official:
            rows["official", L] = run_point(args.official, "official", L, args)
            print(f"# official L={L}: {rows['official', L]}", file=sys.stderr, flush=True)
        for name, tree in trees.items():
            for kind in kinds:
                rows[name, L, kind] = run_point(tree, kind, L, args)
                print(f"# {name} L={L} {kind}: {rows[name, L, kind]}", file=sys.stderr, flush=True)

    print(f"\n{harness.machine_stamp(args.threads)}; load average before {load_before}. Tiny Mistral (hidden {HIDDEN}, "
          f"{LAYERS} layers, {HEADS} heads, intermediate {INTERMEDIATE}, vocab {VOCAB}), N={N_THOUGHT}, K={N_TALK}, "
          f"P={N_PASSES}, batch 1, fp32; forward + backward; median of {args.steps} steps after a warm-up, "
          f"{args.repeats} fresh process(es) per point.\n")
    for name in trees:
        print_tree_table(name, trees[name], rows, lengths)
    first, *others = list(trees)
    for other in others:
        print(f"**{other} vs {first}** (same run): speed-up = {first} ms / {other} ms\n")
        print("| L | speed-up | peak MiB change |")
        print("|---|---|---|")
        for L in lengths:
            a, b = rows.get((first, L, "quietstar")), rows.get((other, L, "quietstar"))
            if a is not None and b is not None:
                print(f"| {L} | {a['step_ms'] / b['step_ms']:.2f}x | {b['peak_mib'] - a['peak_mib']:+.0f} |")
        print()
    print_flop_bound(lengths)


def print_tree_table(name: str, tree: str, rows: dict, lengths: list[int]) -> None:
    print(f"**{name}** ({tree})\n")
    print("| L | Quiet-STaR ms | plain ms | cost ratio | FLOP ratio | cost / FLOP | given thoughts ms (no sampling) "
          "| no-sampling gain | peak MiB | plain peak MiB | above plain MiB | official ms | speed-up vs official "
          "| official peak MiB | incremental ms | incremental vs official | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for L in lengths:
        qs, plain, given = (rows.get((name, L, k)) for k in ("quietstar", "plain", "given"))
        if qs is None or plain is None:
            continue
        cost, flops = qs["step_ms"] / plain["step_ms"], flop_ratio(L)
        g = f"{given['step_ms']:.1f} | {100 * (1 - given['step_ms'] / qs['step_ms']):.0f}%" if given else "- | -"
        off = rows.get(("official", L))
        o = f"{off['step_ms']:.1f} | {off['step_ms'] / qs['step_ms']:.2f}x | {off['peak_mib']:.0f}" if off else "- | - | -"
        inc = rows.get((name, L, "incremental"))
        i = f"{inc['step_ms']:.1f} | " + (f"{off['step_ms'] / inc['step_ms']:.2f}x" if off else "-") if inc else "- | -"
        print(f"| {L} | {qs['step_ms']:.1f} | {plain['step_ms']:.2f} | {cost:.1f}x | {flops:.1f}x | {cost / flops:.2f} "
              f"| {g} | {qs['peak_mib']:.0f} | {plain['peak_mib']:.0f} | {qs['peak_mib'] - plain['peak_mib']:.0f} "
              f"| {o} | {i} | {qs['load']:.1f} |")
    print()


def print_flop_bound(lengths: list[int]) -> None:
    print("FLOP bound on the speed-up over the official code (official FLOPs / ours, the model above): what equal "
          "efficiency of both codes allows; beyond it only the official's slower kernels (dense masked attention) help.\n")
    print("| L | official GFLOP | ours (replay) GFLOP | bound, replay | ours (incremental) GFLOP | bound, incremental |")
    print("|---|---|---|---|---|---|")
    for L in lengths:
        f = step_flops(L)
        print(f"| {L} | {f['official'] / 1e9:.0f} | {f['quietstar'] / 1e9:.0f} | {f['official'] / f['quietstar']:.2f}x "
              f"| {f['incremental'] / 1e9:.0f} | {f['official'] / f['incremental']:.2f}x |")


if __name__ == "__main__":
    main()
