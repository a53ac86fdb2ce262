"""Held-out next-token NLL, base vs thinking: the evidence the paper argues from.

    report = heldout_evaluation(model, tokenizer, open("heldout.txt").read(), seq_len=128, seeds=(0, 1, 2))
    print(report.to_markdown())
    quietstar-heldout --model runs/x/final --file heldout.txt --seq-len 128 --seeds 0 1 2

The text is cut into consecutive windows of ``seq_len`` tokens (no special tokens added: base,
control and thinking models see the same tokens). At every position ``i`` whose next token exists:

* base NLL: ``-log p_base(x_{i+1})`` from the hidden state without a thought (deterministic);
* thinking NLL: ``-log p_mixed(x_{i+1})``, the mixing head's blend of the post-thought and the base
  prediction, averaged over every sampled thought: ``n_passes`` per position per seed, each seed a
  fixed ``torch.Generator`` seed, so a report is reproducible;
* reward: the model's REINFORCE reward of each thought (sum over the K talk tokens of the mixed
  log-probability gain over the base), at the positions whose K targets all exist;
* mixing weight ``w`` of the first talk token.

Tokens are then grouped by base NLL into deciles (decile 10 = the hardest 10%, where the paper says
thinking helps most). ``helped_share`` is the share of positions whose mean thinking NLL is below
the base NLL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..losses import IGNORE, talk_targets, token_log_probs
from ..loading import add_model_arguments, load_from_args
from .metric import sequence_logits

__all__ = ["HeldoutReport", "by_decile", "heldout_evaluation", "text_windows", "main"]


@dataclasses.dataclass
class HeldoutReport:
    n_tokens: int  # scored positions (each has a real next token)
    seeds: list[int]
    n_passes: int  # thoughts per position per seed
    nll_base: float
    nll_thinking: float
    helped_share: float
    reward_mean: float
    reward_positive_share: float
    mixing_weight: dict[str, float]  # mean, std, p10, p50, p90 of w (first talk token)
    deciles: list[dict]  # per base-NLL decile: n, nll_base, nll_thinking, helped_share
    per_token: dict[str, list[float]] | None = None  # base / thinking NLL per scored position, in text order

    @property
    def hard(self) -> dict:
        """The hardest 10% of tokens by base NLL (the last decile)."""
        return self.deciles[-1]

    def to_dict(self, per_token: bool = False) -> dict:
        out = dataclasses.asdict(self)
        if not per_token:
            out.pop("per_token")
        out["hard"] = self.hard
        return out

    def to_markdown(self) -> str:
        lines = [
            f"{self.n_tokens} held-out tokens, seeds {self.seeds} x {self.n_passes} thoughts per position",
            "",
            "| tokens | n | NLL base | NLL thinking | thinking - base | thinking helps |",
            "|---|---|---|---|---|---|",
            _row("all", self.n_tokens, self.nll_base, self.nll_thinking, self.helped_share),
            _row("hardest 10% (by base NLL)", self.hard["n"], self.hard["nll_base"], self.hard["nll_thinking"],
                 self.hard["helped_share"]),
        ]
        lines += [_row(f"decile {d['decile']}", d["n"], d["nll_base"], d["nll_thinking"], d["helped_share"])
                  for d in self.deciles]
        w = self.mixing_weight
        lines += ["", f"mean reward {self.reward_mean:.4f} (positive for {self.reward_positive_share:.1%} of thoughts); "
                      f"mixing weight w mean {w['mean']:.4f} std {w['std']:.4f} (p10 {w['p10']:.4f}, "
                      f"p50 {w['p50']:.4f}, p90 {w['p90']:.4f})"]
        return "\n".join(lines)


def _row(name, n, base, thinking, helped) -> str:
    return f"| {name} | {n} | {base:.4f} | {thinking:.4f} | {thinking - base:+.4f} | {helped:.1%} |"


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> list[list[int]]:
    """Consecutive ``seq_len``-token windows of ``text``; a last window of >= 2 tokens is kept short."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a position and its next token), got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"the held-out text has {len(ids)} tokens: too short to score (need at least 2)")
    return windows[:max_windows] if max_windows else windows


def _batches(windows: list[list[int]], batch_size: int, pad_id: int):
    """Right-padded ``(input_ids, attention_mask)`` batches, in text order."""
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, window in enumerate(chunk):
            ids[row, : len(window)] = torch.tensor(window)
            mask[row, : len(window)] = 1
        yield ids, mask


@torch.no_grad()
def _base_scores(model, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    """Per-position base NLL ``[B, L]`` of a plain causal LM (or a Quiet-STaR model's base LM)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = sequence_logits(model, input_ids, attention_mask, use_thoughts=False)
    next_token = talk_targets(input_ids, attention_mask, 1)[:, :, 0]
    return {"scored": next_token != IGNORE, "base": -token_log_probs(logits, next_token)}


@torch.no_grad()
def _score_batch(model, input_ids, attention_mask, seed: int) -> dict[str, torch.Tensor]:
    """Per-position scores of one batch and one seed, each ``[B, L]`` (``[B, P, L]`` per thought)."""
    P, K = model.config.n_passes, model.config.n_talk_tokens
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    # The per-target log-probs are all this needs: the memory-light forward keeps no logits.
    # Its targets are the input's own next tokens, the same talk_targets as here.
    out = model(input_ids, attention_mask=attention_mask, generator=generator, return_logits=False)
    B, L = input_ids.shape
    targets = talk_targets(input_ids, attention_mask, K)  # [B, L, K]; -100 where absent
    scored = targets[:, :, 0] != IGNORE  # [B, L]
    return {
        "scored": scored,
        "base": -out.base_log_probs.view(B, P, L)[:, 0],  # same for every pass
        "thinking": -out.mixed_log_probs[:, :, 0].view(B, P, L),
        "rewarded": (targets != IGNORE).all(-1),
        "reward": out.rewards.float().view(B, P, L),
        "weight": out.mixing_weights[..., 0].float().view(B, P, L),
    }


def heldout_evaluation(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = 128,
    batch_size: int = 4,
    seeds: tuple[int, ...] | list[int] = (0,),
    max_windows: int | None = None,
    progress: bool = False,
    keep_per_token: bool = False,
    thinking: bool = True,
) -> HeldoutReport:
    """Score a ``QuietStarForCausalLM`` on held-out ``text``; see the module docstring.

    ``thinking=False`` scores the base prediction only (no thoughts sampled; any causal LM, e.g. an
    experiment's control or untouched base): the thinking fields then equal the base ones and the
    reward and mixing-weight statistics are 0.
    """
    if thinking and getattr(getattr(model, "config", None), "model_type", None) != "quietstar":
        raise TypeError("heldout_evaluation needs a QuietStarForCausalLM (wrap a base model with from_base first), "
                        "or thinking=False for the base prediction alone")
    if not seeds:
        raise ValueError("give at least one seed")
    windows = text_windows(tokenizer, text, seq_len, max_windows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        scores = _collect_scores(model, windows, batch_size, pad_id, seeds, thinking, progress)
    finally:
        model.train(was_training)
    return _report(*scores, seeds=seeds, n_passes=model.config.n_passes if thinking else 0, keep_per_token=keep_per_token)


def _collect_scores(model, windows, batch_size: int, pad_id: int, seeds, thinking: bool, progress: bool):
    """Per scored token: base NLL, thinking NLL (mean over seeds and passes); rewards and mixing weights."""
    from tqdm.auto import tqdm

    base_all, think_all, reward_all, weight_all = [], [], [], []
    n_batches = -(-len(windows) // batch_size)
    with tqdm(total=n_batches * (len(seeds) if thinking else 1), disable=not progress, desc="held-out", file=sys.stderr) as bar:
        for ids, mask in _batches(windows, batch_size, pad_id):
            if not thinking:
                scores = _base_scores(model, ids, mask)
                base_all.append(scores["base"][scores["scored"]].cpu())
                think_all.append(base_all[-1])
                bar.update(1)
                continue
            per_seed = []
            for seed in seeds:
                per_seed.append(_score_batch(model, ids, mask, seed))
                bar.update(1)
            scored, rewarded = per_seed[0]["scored"], per_seed[0]["rewarded"]
            thinking_nll = torch.stack([s["thinking"] for s in per_seed]).mean(dim=(0, 2))  # mean over seeds and passes
            base_all.append(per_seed[0]["base"][scored].cpu())
            think_all.append(thinking_nll[scored].cpu())
            reward_all.append(torch.cat([s["reward"].transpose(1, 2)[rewarded].flatten() for s in per_seed]).cpu())
            weight_all.append(torch.cat([s["weight"].transpose(1, 2)[scored].flatten() for s in per_seed]).cpu())
    return base_all, think_all, reward_all, weight_all


def _report(base_all, think_all, reward_all, weight_all, *, seeds, n_passes: int, keep_per_token: bool) -> HeldoutReport:
    base, thinking_nll = torch.cat(base_all).double(), torch.cat(think_all).double()
    rewards = torch.cat(reward_all).double() if reward_all else torch.zeros(0, dtype=torch.float64)
    weights = torch.cat(weight_all).double() if weight_all else torch.zeros(1, dtype=torch.float64)
    helped = thinking_nll < base
    deciles = [{"decile": d["decile"], "n": d["n"], "nll_base": d["base"], "nll_thinking": d["thinking"],
                "helped_share": d["helped"]} for d in by_decile(base, {"base": base, "thinking": thinking_nll, "helped": helped})]
    quantiles = torch.quantile(weights, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist() if len(weights) else [0.0] * 3
    return HeldoutReport(
        n_tokens=len(base),
        seeds=list(seeds),
        n_passes=n_passes,
        nll_base=base.mean().item(),
        nll_thinking=thinking_nll.mean().item(),
        helped_share=helped.double().mean().item(),
        reward_mean=rewards.mean().item() if len(rewards) else 0.0,
        reward_positive_share=(rewards > 0).double().mean().item() if len(rewards) else 0.0,
        mixing_weight={"mean": weights.mean().item(), "std": weights.std(unbiased=False).item(), "p10": quantiles[0],
                       "p50": quantiles[1], "p90": quantiles[2]},
        deciles=deciles,
        per_token={"base": base.tolist(), "thinking": thinking_nll.tolist()} if keep_per_token else None,
    )


def by_decile(reference: torch.Tensor, columns: dict[str, torch.Tensor]) -> list[dict]:
    """Mean of each per-token column within each decile of ``reference`` (decile 10 = largest values).

    Rank-based, so ties and small sets still give 10 groups where there are >= 10 tokens. Experiments
    pass the untouched base model's NLL as ``reference`` so that every model is compared on the same tokens.
    """
    reference = torch.as_tensor(reference, dtype=torch.float64)
    order = torch.argsort(reference, stable=True)
    decile_of = torch.empty_like(order)
    decile_of[order] = torch.arange(len(reference)) * 10 // max(1, len(reference))
    rows = []
    for d in range(10):
        sel = decile_of == d
        if sel.any():
            rows.append({"decile": d + 1, "n": int(sel.sum()),
                         **{name: torch.as_tensor(col, dtype=torch.float64)[sel].mean().item() for name, col in columns.items()}})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietstar-heldout", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--file", required=True, help="held-out text file (UTF-8)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="thought-sampling seeds, averaged")
    p.add_argument("--max-windows", type=int, default=None, help="first N windows only")
    p.add_argument("--output", default=None, help="write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not Path(args.file).is_file():
        sys.exit(f"quietstar-heldout: --file {args.file!r} does not exist")
    model, tokenizer = load_from_args(args, "quietstar-heldout")
    text = Path(args.file).read_text(encoding="utf-8")
    report = heldout_evaluation(model, tokenizer, text, seq_len=args.seq_len, batch_size=args.batch_size,
                                seeds=args.seeds, max_windows=args.max_windows, progress=sys.stderr.isatty())
    print(report.to_markdown())
    if args.output:
        Path(args.output).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
