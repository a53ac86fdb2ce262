"""Training step vs sequence length: a Quiet-STaR step against a plain step of the same model.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/step_vs_length.py                  # L = 64..1024
    python benchmarks/step_vs_length.py --lengths 256 --steps 3                       # one point
    python benchmarks/step_vs_length.py --tree base=/path/to/old/checkout --tree new=.  # before/after
    python benchmarks/step_vs_length.py --official /tmp/official_site                   # + the official code
    # on a GPU: SmolLM2-135M's size as a Mistral, bf16 weights, one process per side, B x L points, a
    # memory ceiling at B 1, one profiled step per side (gpu_check.sh stage "official")
    python benchmarks/step_vs_length.py --model smollm2-mistral --lengths 4x256,1x512,1x1024,1x2048 \
        --ceiling 4096,8192,16384 --official /tmp/official_site --profile --json $OUT/official.jsonl

The model is harness.py's ``tiny-mistral`` (hidden 256, 2 layers, 4 heads, vocab 514, random weights,
sliding window off) or ``--model smollm2-mistral``; Quiet-STaR with N = 9, K = 4, P = 2 (S = N + K + 1
= 14); a point is ``BxL`` (a bare L: B 1); weights fp32 on a CPU, bf16 on a GPU (``--dtype``), ours
with ``quietstar_triton`` on a GPU (``--attn``). A step is forward + backward (no optimiser).
On a GPU (``--one-process``, the default there) each side runs all its points in one process, and
peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps; out of memory is reported
as such. ``--ceiling`` lengths run at B 1 after the points, one untimed-warm-up-free step each, up to
the first out-of-memory per side: the longest L each side trains at. On a CPU every (tree, L, kind)
point runs in its own fresh process (``--repeats`` of them; the median over processes of each process's median
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
KINDS_WITH_THOUGHTS = ("quietstar", "incremental", "given")


def shape_of(model: str) -> dict:
    return harness.MODEL_CONFIGS[model][1]


def build_model(kind: str, model: str = "tiny-mistral", dtype=None, device="cpu", attn=None, base=None):
    import torch

    if base is None:
        with torch.device(device):
            base = harness.random_base(model, attn_implementation="sdpa", dtype=dtype)
    if kind == "plain":
        return base.train()
    from quietstar import QuietStarForCausalLM

    extra = {"attn_implementation": attn} if attn else {}
    wrapped = QuietStarForCausalLM.from_base(base, n_thought_tokens=N_THOUGHT, n_talk_tokens=N_TALK,
                                             n_passes=N_PASSES, **extra)
    return wrapped.to(device, dtype).train()


def worker(spec: dict):
    """One process: every kind at every point of ``spec``; yields one result dict per (kind, point).

    Plain points first (on the bare base model), then the base is wrapped once for the thought kinds."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec.get("dtype") or ("bfloat16" if device == "cuda" else "float32"))
    name = spec.get("model", "tiny-mistral")
    vocab = shape_of(name)["vocab_size"]
    with torch.device(device):
        base = harness.random_base(name, attn_implementation="sdpa", dtype=dtype)
    import quietstar

    wrapped, ceiling_failed = None, set()
    for kind in spec["kinds"]:
        if kind == "plain":
            model = base.train()
        else:
            model = wrapped = wrapped or build_model(kind, name, dtype, device, spec.get("attn"), base)
            model.config.thought_forward = "incremental" if kind == "incremental" else "replay"
        for i, (batch, length, *ceiling) in enumerate(spec["points"]):
            ceiling = bool(ceiling and ceiling[0])
            if ceiling and kind in ceiling_failed:
                continue
            step = make_step(model, kind, batch, length, vocab, device)
            row = harness.measure_step(step, 1 if ceiling else spec["steps"], warmup=0 if ceiling else 1)
            if ceiling and row["oom"]:
                ceiling_failed.add(kind)
            if spec.get("profile") and i == 0 and kind != "given" and not row["oom"]:
                print(f"# ours {kind}, top kernels of one step at B {batch} L {length}:\n{harness.top_kernels_table(step)}",
                      file=sys.stderr, flush=True)
            model.zero_grad(set_to_none=True)
            yield dict(row, kind=kind, batch=batch, length=length, ceiling=ceiling, loss=row.pop("result", None),
                       quietstar_file=quietstar.__file__)


def make_step(model, kind: str, batch: int, length: int, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    thoughts = None
    if kind == "given":
        thoughts = torch.randint(0, vocab - 1, (batch * N_PASSES, length, N_THOUGHT), generator=g).to(device)
    sampler = torch.Generator(device).manual_seed(2)

    def step():
        if kind == "plain":
            loss = model(ids, attention_mask=mask, labels=ids).loss
        else:
            loss = model(ids, attention_mask=mask, labels=ids, thought_ids=thoughts, generator=sampler).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def step_flops(L: int, model: str = "tiny-mistral", batch: int = 1) -> dict:
    """FLOPs of one step of each kind (the model in the module docstring)."""
    from quietstar.layout import useful_entries

    c = shape_of(model)
    hidden, layers, vocab, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = hidden * c["num_key_value_heads"] // c["num_attention_heads"]
    N, K, P, S = N_THOUGHT, N_TALK, N_PASSES, N_THOUGHT + N_TALK + 1
    M = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)  # q, o, k, v and the gated MLP
    A, h = 4 * hidden * layers, 2 * hidden * vocab
    plain = 3 * (M * L + A * useful_entries(L, 1) + h * L)
    replay = 3 * P * (M * (1 + S) * L + A * useful_entries(L, 1 + S) + h * (1 + K + N) * L)
    sampling = P * (M * (N + 1) * L + A * sum(useful_entries(L, s + 1, 1) for s in range(N + 1)) + h * N * L)
    # The official step: n_ahead + n_ahead_talk - 1 = 15 forwards with grad of L new tokens each, every
    # one over all (i + 1) L keys so far with a dense mask (computed, masked or not), logits every time.
    official = 3 * P * sum(M * L + A * L * (i + 1) * L + h * L for i in range(N + 3 + K - 1))
    flops = dict(plain=plain, quietstar=replay + sampling, incremental=replay + P * h * N * L, official=official)
    return {k: batch * v for k, v in flops.items()}


def flop_ratio(L: int, model: str = "tiny-mistral") -> float:
    flops = step_flops(L, model)
    return flops["quietstar"] / flops["plain"]


def run_worker(tree: str, official: bool, spec: dict, timeout: float | None = None) -> list[dict]:
    """``tree`` is the PYTHONPATH of the worker: a checkout of this project, or the official install.
    Returns the rows the worker finished (one JSON line each), also when it failed or timed out later."""
    env = dict(os.environ, PYTHONPATH=tree if official else os.path.abspath(tree), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    here = os.path.dirname(os.path.abspath(__file__))
    script = [os.path.join(here, "official_step.py")] if official else [__file__, "--worker"]
    try:
        proc = subprocess.run([sys.executable, *script, json.dumps(spec)], env=env, capture_output=True, text=True,
                              timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or "", exc.stderr or "", "timeout"
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    sys.stderr.write("".join(line + "\n" for line in err.splitlines() if line.startswith(("#", " ", "-")) or "|" in line))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc != 0:
        print(f"!!! {'official' if official else tree} worker stopped ({rc}) after {len(rows)} row(s):\n{err[-3000:]}",
              file=sys.stderr, flush=True)
    if not official:
        for row in rows:
            if not row["quietstar_file"].startswith(os.path.abspath(tree)):
                raise SystemExit(f"worker imported {row['quietstar_file']}, not the tree {tree}: check PYTHONPATH")
    for row in rows:
        row.setdefault("kind", "official")
    return rows


def parse_points(lengths: str, ceiling: str | None) -> list[list]:
    points = [[int(b), int(L)] for b, _, L in (x.rpartition("x") for x in lengths.split(",")) for b in [b or 1]]
    return points + [[1, int(L), True] for L in (ceiling.split(",") if ceiling else [])]


def collect(args, trees: dict, points: list) -> list[dict]:
    """All rows: one process per side and tree (``--one-process``) or one per point and kind (fresh RSS)."""
    base = dict(steps=args.steps, threads=args.threads, model=args.model, dtype=args.dtype, attn=args.attn,
                profile=args.profile)
    kinds, rows = args.kinds.split(","), []
    if args.one_process:
        if args.official:
            rows += [dict(r, tree="official") for r in run_worker(args.official, True, dict(base, points=points), args.timeout)]
        for name, tree in trees.items():
            spec = dict(base, kinds=kinds, points=points)
            rows += [dict(r, tree=name) for r in run_worker(tree, False, spec, args.timeout)]
        return rows
    for point in points:  # trees interleaved per point, so a change of load hits both alike
        sides = [("official", args.official, True, ["official"])] if args.official else []
        for name, tree, official, side_kinds in sides + [(n, t, False, kinds) for n, t in trees.items()]:
            for kind in side_kinds:
                spec = dict(base, kinds=[kind], points=[point], profile=False)
                reps = [run_worker(tree, official, spec, args.timeout) for _ in range(args.repeats)]
                reps = [r[0] for r in reps if r]
                if reps:
                    row = dict(reps[0], tree=name, load=os.getloadavg()[0])
                    if not row["oom"]:
                        row.update(step_ms=statistics.median(r["step_ms"] for r in reps),
                                   peak_mib=statistics.median(r["peak_mib"] for r in reps))
                    rows.append(row)
                    print(f"# {name} {point} {kind}: {row}", file=sys.stderr, flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="64,128,256,512,1024", help="points, comma-separated: L (batch 1) or BxL")
    parser.add_argument("--ceiling", help="B 1 lengths run after the points until the first out of memory per side")
    parser.add_argument("--model", default="tiny-mistral", choices=["tiny-mistral", "smollm2-mistral"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--attn", help="our thought attention (default: quietstar_triton on a GPU, the model's default on CPU)")
    parser.add_argument("--tree", action="append", help="NAME=PATH of a checkout to import quietstar from (repeatable)")
    parser.add_argument("--kinds", default="plain,quietstar,given")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per point (CPU mode)")
    parser.add_argument("--official", help="PYTHONPATH of the official code's install (official_step.py); omit to skip it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: with 2 threads a loaded machine makes OpenMP stall, 8x slower here)")
    parser.add_argument("--one-process", action=argparse.BooleanOptionalAction, default=None,
                        help="all points of a side in one process (default: on a GPU)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top kernels of one step per side and kind (stderr)")
    parser.add_argument("--timeout", type=float, help="seconds per worker process; a cut-short worker keeps its finished rows")
    parser.add_argument("--json", help="also write every row as a JSON line to this file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        for row in worker(json.loads(args.worker)):
            print(json.dumps(row), flush=True)
        return
    import torch

    cuda = torch.cuda.is_available()
    if args.one_process is None:
        args.one_process = cuda
    if args.attn is None and cuda:
        args.attn = "quietstar_triton"
    trees = dict(t.split("=", 1) for t in (args.tree or [f"this={harness.REPO}"]))
    points = parse_points(args.lengths, args.ceiling)
    load_before = harness.load_average()
    rows = collect(args, trees, points)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    c = shape_of(args.model)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    print(f"\n{harness.machine_stamp(args.threads)}; load average before {load_before}. {args.model} (hidden "
          f"{c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, vocab {c['vocab_size']}), "
          f"N={N_THOUGHT}, K={N_TALK}, P={N_PASSES}, {dtype} weights, ours with {args.attn or 'the default attention'}; "
          f"forward + backward; median of {args.steps} steps after a warm-up, "
          f"{'one process per side' if args.one_process else f'{args.repeats} fresh process(es) per point'}.\n")
    table = {(r["tree"], r["batch"], r["length"], r["kind"], r["ceiling"]): r for r in rows}
    timed = [tuple(p) for p in points if len(p) == 2]
    for name in trees:
        print_tree_table(name, trees[name], table, timed, args.model)
    first, *others = list(trees)
    for other in others:
        print(f"**{other} vs {first}** (same run): speed-up = {first} ms / {other} ms\n")
        print("| B x L | speed-up | peak MiB change |")
        print("|---|---|---|")
        for B, L in timed:
            a, b = table.get((first, B, L, "quietstar", False)), table.get((other, B, L, "quietstar", False))
            if a and b and not a["oom"] and not b["oom"]:
                print(f"| {B} x {L} | {a['step_ms'] / b['step_ms']:.2f}x | {b['peak_mib'] - a['peak_mib']:+.0f} |")
        print()
    print_ceiling(rows)
    print_flop_bound(timed, args.model)


def fmt(row, key="step_ms", digits=1) -> str:
    if row is None:
        return "-"
    return "OOM" if row["oom"] else f"{row[key]:.{digits}f}"


def print_tree_table(name: str, tree: str, table: dict, points: list, model: str) -> None:
    print(f"**{name}** ({tree})\n")
    print("| B x L | Quiet-STaR ms | plain ms | cost ratio | FLOP ratio | cost / FLOP | given thoughts ms | peak MiB "
          "| plain peak MiB | above plain MiB | official ms | speed-up vs official | FLOP bound | of the bound "
          "| official peak MiB | official above plain MiB | memory above plain, official / ours | incremental ms "
          "| incremental vs official |")
    print("|---|" * 1 + "---|" * 18)
    for B, L in points:
        qs, plain, given, inc = (table.get((name, B, L, k, False)) for k in ("quietstar", "plain", "given", "incremental"))
        off = table.get(("official", B, L, "official", False))
        ok = lambda r: r is not None and not r["oom"]  # noqa: E731
        cost = qs["step_ms"] / plain["step_ms"] if ok(qs) and ok(plain) else None
        flops = step_flops(L, model, B)
        bound = flops["official"] / flops["quietstar"]
        speed = off["step_ms"] / qs["step_ms"] if ok(off) and ok(qs) else None
        above = qs["peak_mib"] - plain["peak_mib"] if ok(qs) and ok(plain) else None
        off_above = off["peak_mib"] - plain["peak_mib"] if ok(off) and ok(plain) else None
        cells = [f"{B} x {L}", fmt(qs), fmt(plain, digits=2), f"{cost:.1f}x" if cost else "-", f"{flop_ratio(L, model):.1f}x",
                 f"{cost / flop_ratio(L, model):.2f}" if cost else "-", fmt(given), fmt(qs, "peak_mib", 0),
                 fmt(plain, "peak_mib", 0), f"{above:.0f}" if above is not None else "-", fmt(off),
                 f"**{speed:.2f}x**" if speed else "-", f"{bound:.2f}x", f"{speed / bound:.2f}" if speed else "-",
                 fmt(off, "peak_mib", 0), f"{off_above:.0f}" if off_above is not None else "-",
                 f"{off_above / above:.2f}x" if off_above and above else "-", fmt(inc),
                 f"{off['step_ms'] / inc['step_ms']:.2f}x" if ok(off) and ok(inc) else "-"]
        print("| " + " | ".join(cells) + " |")
    print()


def print_ceiling(rows: list[dict]) -> None:
    ceiling = [r for r in rows if r["ceiling"]]
    if not ceiling:
        return
    print("Memory ceiling at B 1 (one step each, lengths in order up to the first out of memory):\n")
    print("| side | kind | longest L trained | first L out of memory | peak MiB at the longest |")
    print("|---|---|---|---|---|")
    for tree, kind in dict.fromkeys((r["tree"], r["kind"]) for r in ceiling):
        mine = [r for r in ceiling if (r["tree"], r["kind"]) == (tree, kind)]
        fits = [r for r in mine if not r["oom"]]
        oom = [r["length"] for r in mine if r["oom"]]
        best = max(fits, key=lambda r: r["length"]) if fits else None
        print(f"| {tree} | {kind} | {best['length'] if best else '-'} | {oom[0] if oom else 'none up to the last tried'} "
              f"| {fmt(best, 'peak_mib', 0)} |")
    print()


def print_flop_bound(points: list, model: str) -> None:
    print("FLOP bound on the speed-up over the official code (official FLOPs / ours, the model above): what equal "
          "efficiency of both codes allows; beyond it only the official's slower kernels (dense masked attention) help.\n")
    print("| B x L | official GFLOP | ours (replay) GFLOP | bound, replay | ours (incremental) GFLOP | bound, incremental |")
    print("|---|---|---|---|---|---|")
    for B, L in points:
        f = step_flops(L, model, B)
        print(f"| {B} x {L} | {f['official'] / 1e9:.0f} | {f['quietstar'] / 1e9:.0f} | {f['official'] / f['quietstar']:.2f}x "
              f"| {f['incremental'] / 1e9:.0f} | {f['official'] / f['incremental']:.2f}x |")


if __name__ == "__main__":
    main()
