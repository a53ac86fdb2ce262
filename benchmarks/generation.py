"""Per-token generation latency, in one run: the base model's generate, ours with N thought tokens,
and the naive loop that re-runs the full thinking forward for every new token.

    python benchmarks/generation.py                      # tiny Llama + SmolLM2-135M, CPU
    python benchmarks/generation.py --models tiny --new-tokens 64 --n-thought-tokens 4 8

Per-token latency of a cached generate = (t(T new tokens) - t(1 new token)) / (T - 1), so the prompt's
prefill is not counted; the naive loop has no prefill, so its figure is t(T) / T; t = the median of
``--repeats`` calls after a warm-up. The tiny model is harness.py's ``tiny-llama`` at hidden 32, vocab 96. Greedy decoding,
greedy thoughts (so every method emits the same tokens); both generates use stock sdpa attention.
Targets: ours <= 1.2 * (N + 3) x base, and >= 5x faster than the naive loop at 64 tokens.
"""

from __future__ import annotations

import argparse
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
    return harness.time_steps(fn, repeats, warmup=0).wall_ms


def tiny_llama():
    base = harness.random_base("tiny-llama", vocab_size=96, hidden_size=32, intermediate_size=64, max_position_embeddings=512)
    return base.eval(), 96


def smollm2():
    from quietstar.assets import load_smollm2

    model, tokenizer = load_smollm2()
    return model, len(tokenizer)


def bench(name, base, vocab, n_thought_list, new_tokens, prompt_len, repeats, naive_repeats):
    base.set_attn_implementation("sdpa")
    prompt = torch.randint(0, min(vocab, base.config.vocab_size), (1, prompt_len), generator=torch.Generator().manual_seed(0))
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompt))

    def run_base(n):
        return lambda: base.generate(prompt, max_new_tokens=n, min_new_tokens=n, **greedy)

    run_base(2)()  # warm-up
    base_tok = (timed(run_base(new_tokens), repeats) - timed(run_base(1), repeats)) / (new_tokens - 1)
    rows = [(name, "base generate", 0, base_tok, 1.0, None, None)]
    for n in n_thought_list:
        model = QuietStarForCausalLM.from_base(base, n_thought_tokens=n, n_talk_tokens=4, n_passes=1, thought_temperature=0.0).eval()
        model.generation_config.eos_token_id = None

        def run_ours(k):
            return lambda: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, **greedy)

        run_ours(2)()
        ours_tok = (timed(run_ours(new_tokens), repeats) - timed(run_ours(1), repeats)) / (new_tokens - 1)
        naive_out = []
        naive_tok = timed(lambda: naive_out.append(naive_generate(model, prompt, max_new_tokens=new_tokens)), naive_repeats) / new_tokens
        same = torch.equal(model.generate(prompt, max_new_tokens=new_tokens, **greedy), naive_out[-1])
        rows.append((name, f"ours N={n}", n, ours_tok, ours_tok / base_tok, 1.2 * (n + 3), naive_tok / ours_tok))
        rows.append((name, f"naive loop N={n}", n, naive_tok, naive_tok / base_tok, None, same))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--n-thought-tokens", nargs="+", type=int, default=[4, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{harness.machine_stamp(torch.get_num_threads())}\nCPU; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"{'model':<8} {'method':<18} {'ms/token':>9} {'x base':>8} {'target':>8} {'naive/ours':>10}")
    for name in args.models:
        base, vocab = tiny_llama() if name == "tiny" else smollm2()
        naive_repeats = args.repeats if name == "tiny" else 1
        with torch.no_grad():
            rows = bench(name, base, vocab, args.n_thought_tokens, args.new_tokens, args.prompt_len, args.repeats, naive_repeats)
        for model, method, n, ms, ratio, target, extra in rows:
            target_s = f"<= {target:.1f}" if target else ""
            if isinstance(extra, float):
                extra_s = f"{extra:.1f}x"
            elif extra is None:
                extra_s = ""
            else:
                extra_s = "same tokens" if extra else "DIFFERENT"
            print(f"{model:<8} {method:<18} {ms:>9.2f} {ratio:>8.2f} {target_s:>8} {extra_s:>10}", flush=True)


if __name__ == "__main__":
    main()
