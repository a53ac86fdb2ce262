"""Per-token generation latency and tokens/s, in one run: plain generation of the base model, thinking
generation with N thought tokens, per decode mode, and the official way of thinking while generating.

    python benchmarks/generation.py                      # tiny Llama + SmolLM2-135M, CPU
    python benchmarks/generation.py --models tiny --new-tokens 64 --n-thought-tokens 4 8
    # on a GPU (gpu_check.sh stage "generation"): SmolLM2-135M's shape, random bf16 weights
    python benchmarks/generation.py --models smollm2-shape --batch 1 8 --n-thought-tokens 4 9 \
        --decode dynamic compiled --naive-prompt-len 512 --json $OUT/generation.jsonl

Rows per model, batch and decode mode (``dynamic``: growing cache; ``static``: preallocated cache;
``compiled``: static + the single-token step under ``torch.compile(mode="reduce-overhead")``, CUDA
graphs on a GPU): ``plain`` is N = 0 through the same loop and step (the base model's own generation),
``N=n`` thinks before every token; with ``--hf-base`` also the base model's stock ``generate``.
Per-token latency of a cached generate = (t(T new tokens) - t(1 new token)) / (T - 1), so the
prompt's prefill is not counted; t = the median of ``--repeats`` calls after a warm-up (which, for
``compiled``, compiles). ``naive N=n`` is the official way (``zero-shotcot-eval.py``): a full parallel
forward with thoughts at every position per emitted token (:func:`quietstar.generation.naive_generate`,
the same algorithm on our forward), at batch 1 and a ``--naive-prompt-len`` prompt, t(T) / T.
Greedy decoding, greedy thoughts (every method emits the same tokens); stock sdpa attention.
Targets: thinking <= 1.2 * (N + 3) x plain per token at batch 1; >= 10x faster than the naive loop
at a 512-token prompt (``naive/ours``: ours at the same N, batch 1, best decode mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quietstar import QuietStarForCausalLM  # noqa: E402
from quietstar.generation import naive_generate  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls of ``fn`` (the warm-up is the caller's)."""
    return harness.time_steps(fn, repeats, warmup=0, sync=harness.cuda_sync()).wall_ms


def load_base(name: str, device, dtype):
    if name == "tiny":
        base = harness.random_base("tiny-llama", vocab_size=96, hidden_size=32, intermediate_size=64, max_position_embeddings=4096)
        return base.to(device, dtype).eval(), 96
    if name == "smollm2":
        from quietstar.assets import load_smollm2

        model, tokenizer = load_smollm2()
        return model.to(device, dtype).eval(), len(tokenizer)
    with torch.device(device):  # harness shape, random weights (the GPU machine has no network)
        base = harness.random_base(name, dtype=dtype)
    return base.eval(), base.config.vocab_size


def per_token_ms(generate, new_tokens: int, repeats: int) -> float:
    generate(2)()  # warm-up
    return (timed(generate(new_tokens), repeats) - timed(generate(1), repeats)) / (new_tokens - 1)


def bench(name, base, vocab, args, device) -> list[dict]:
    """One wrapper with the largest N (``n_thought_tokens`` per call): per batch and decode mode the first,
    longest call builds the static cache and compiles the step once; every later call reuses them."""
    base.set_attn_implementation("sdpa")
    top = max(args.n_thought_tokens)
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=top, n_talk_tokens=4, n_passes=1,
                                           thought_temperature=0.0).to(device, base.dtype).eval()
    model.generation_config.eos_token_id = None
    rows = []
    for batch in args.batch:
        prompt = torch.randint(0, min(vocab, base.config.vocab_size), (batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(0)).to(device)
        greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompt))
        if args.hf_base:
            run = lambda k: lambda: base.generate(prompt, max_new_tokens=k, min_new_tokens=k, **greedy)  # noqa: E731
            rows.append(row(name, batch, "hf", "hf generate", 0, per_token_ms(run, args.new_tokens, args.repeats)))
        for decode in args.decode:
            def run(k, n, decode=decode):
                return lambda: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, n_thought_tokens=n,
                                              decode=decode, **greedy)

            run(args.new_tokens, top)()  # the longest call first: builds (and compiles) what all others reuse
            for n in (0, *args.n_thought_tokens):
                ms = per_token_ms(lambda k, n=n: run(k, n), args.new_tokens, args.repeats)
                rows.append(row(name, batch, decode, "plain" if n == 0 else f"N={n}", n, ms))
    if args.naive_prompt_len:
        prompt = torch.randint(0, vocab, (1, args.naive_prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
        for n in args.n_thought_tokens:
            model.config.n_thought_tokens = n
            naive_generate(model, prompt, max_new_tokens=1)  # warm-up
            ms = timed(lambda: naive_generate(model, prompt, max_new_tokens=args.naive_tokens), 1) / args.naive_tokens
            rows.append(row(name, 1, "naive", f"naive N={n} (prompt {args.naive_prompt_len})", n, ms))
        model.config.n_thought_tokens = top
    return rows


def row(model, batch, decode, method, n, ms) -> dict:
    return dict(model=model, batch=batch, decode=decode, method=method, n=n, ms_per_token=ms,
                tokens_per_s=1e3 * batch / ms if ms > 0 else float("nan"))


def print_table(rows: list[dict]) -> None:
    plain = {(r["model"], r["batch"], r["decode"]): r["ms_per_token"] for r in rows if r["method"] == "plain"}
    best = {}
    for r in rows:
        if r["n"] and r["batch"] == 1 and r["decode"] not in ("naive", "hf"):
            key = (r["model"], r["n"])
            best[key] = min(best.get(key, float("inf")), r["ms_per_token"])
    print("| model | batch | decode | method | ms/token | tokens/s | x plain (same mode) | target x plain | naive / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = plain.get((r["model"], r["batch"], r["decode"]))
        ratio = f"{r['ms_per_token'] / base:.2f}" if base and r["method"] != "plain" and r["decode"] != "naive" else ""
        target = f"<= {1.2 * (r['n'] + 3):.1f}" if r["n"] and r["decode"] != "naive" and r["batch"] == 1 else ""
        naive = f"{r['ms_per_token'] / best[(r['model'], r['n'])]:.1f}x" if r["decode"] == "naive" and (r["model"], r["n"]) in best else ""
        print(f"| {r['model']} | {r['batch']} | {r['decode']} | {r['method']} | {r['ms_per_token']:.2f} "
              f"| {r['tokens_per_s']:.0f} | {ratio} | {target} | {naive} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"],
                   help="tiny | smollm2 (real weights) | a harness.py shape with random weights (smollm2-shape)")
    p.add_argument("--n-thought-tokens", nargs="+", type=int, default=[4, 8])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--decode", nargs="+", default=["dynamic"], choices=["dynamic", "static", "compiled"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--naive-prompt-len", type=int, default=32, help="prompt of the naive loop (0: skip it)")
    p.add_argument("--naive-tokens", type=int, default=8, help="tokens the naive loop emits (t(T) / T)")
    p.add_argument("--hf-base", action="store_true", help="also time the base model's stock generate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--json", help="also write every row as a JSON line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    print(f"{harness.machine_stamp(torch.get_num_threads())}\n{device}, {dtype}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy\n")
    rows = []
    for name in args.models:
        base, vocab = load_base(name, device, dtype)
        with torch.no_grad():
            rows += bench(name, base, vocab, args, device)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
