"""``quietstar-inspect``: what the model thought at every position of a text, and whether it helped.

For each position i of the text: the token x_i, the thought sampled there, the mixing weight w
(k = 0), the reward r_i (docs/ALGORITHM.md: log-prob gain of the next K tokens from thinking) and the
base loss -log p_base(x_{i+1}). Written as one self-contained HTML file (tokens coloured by reward,
green where thinking helped, red where it hurt; hover a token for its thought; a full table; an
inline SVG plot of reward against base loss) and as a coloured terminal view.

    quietstar-inspect --model PATH --text "Q: 2 + 3 = ?\\nA: 5" --output report.html
    quietstar-inspect --model smollm2 --file notes.txt --output report.html --seed 0
"""

from __future__ import annotations

import argparse
import html
import math
import sys
from dataclasses import dataclass, field

import torch

from .loading import add_model_arguments, load_from_args
from .evaluation.metric import single_pass


@dataclass
class PositionReport:
    index: int
    token: str
    thought: str
    thought_ids: list[int]
    mixing_weight: float
    reward: float | None  # None where fewer than K true next tokens exist
    base_loss: float | None  # -log p_base(x_{i+1}); None at the last position
    mixed_loss: float | None  # -log p_mixed(x_{i+1}) with the thought at i


@dataclass
class Inspection:
    text: str
    model_name: str
    n_thought_tokens: int
    n_talk_tokens: int
    thought_temperature: float
    positions: list[PositionReport] = field(default_factory=list)

    @property
    def rewarded(self) -> list[PositionReport]:
        return [p for p in self.positions if p.reward is not None]


@torch.no_grad()
def inspect_text(model, tokenizer, text: str, *, generator: torch.Generator | None = None, model_name: str = "") -> Inspection:
    """Run ``text`` through the model once (one thought per position) and collect every position."""
    cfg = model.config
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)  # [1, L]
    if ids.shape[1] < 2:
        raise ValueError(f"the text needs at least 2 tokens to inspect, got {ids.shape[1]}")
    with single_pass(model):
        out = model(ids, attention_mask=torch.ones_like(ids), generator=generator)
    L, K = ids.shape[1], cfg.n_talk_tokens
    base_lp = torch.log_softmax(out.base_logits[0].float(), -1)  # [L, V]
    mixed_lp = torch.log_softmax(out.logits[0].float(), -1)
    report = Inspection(text, model_name, cfg.n_thought_tokens, K, cfg.thought_temperature)
    for i in range(L):
        thought_ids = out.thought_ids[0, i].tolist()
        nxt = int(ids[0, i + 1]) if i + 1 < L else None
        report.positions.append(
            PositionReport(
                index=i,
                token=tokenizer.decode([int(ids[0, i])]),
                thought=tokenizer.decode(thought_ids),
                thought_ids=thought_ids,
                mixing_weight=float(out.mixing_weights[0, i, 0]),
                reward=float(out.rewards[0, i]) if i + K < L else None,
                base_loss=None if nxt is None else -float(base_lp[i, nxt]),
                mixed_loss=None if nxt is None else -float(mixed_lp[i, nxt]),
            )
        )
    return report


# ---------------------------------------------------------------- colours


def _reward_scale(report: Inspection) -> float:
    values = [abs(p.reward) for p in report.rewarded]
    return max(values) if values and max(values) > 0 else 1.0


def _reward_rgb(reward: float | None, scale: float) -> tuple[int, int, int]:
    """White at 0, green for a gain, red for a loss; saturation by |r| / max |r|."""
    if reward is None:
        return (235, 235, 235)
    a = min(abs(reward) / scale, 1.0)
    target = (40, 170, 60) if reward > 0 else (215, 50, 40)
    return tuple(round(255 + (c - 255) * a) for c in target)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


# ---------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.text{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:2.1;border:1px solid #ccc;padding:1em}
.tok{padding:2px 1px;border-radius:3px;cursor:help}
table{border-collapse:collapse;font-size:0.9em}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;font-family:ui-monospace,monospace;white-space:pre}
th{background:#f4f4f4}.num{text-align:right}
.legend span{padding:2px 8px;margin-right:4px;border-radius:3px}
"""


def _token_html(text: str) -> str:
    return html.escape(text).replace("\n", "\u21b5\n")


def _scatter_svg(report: Inspection, width: int = 520, height: int = 340) -> str:
    """Reward against base loss for the rewarded positions (inline SVG, no plotting dependency)."""
    points = [(p.base_loss, p.reward, p) for p in report.rewarded if p.base_loss is not None]
    pad = 50
    if not points:
        return "<p>(no rewarded positions: the text is shorter than K + 1 tokens)</p>"
    xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
    x0, x1 = min(0.0, min(xs)), max(xs) or 1.0
    y_abs = max(abs(min(ys)), abs(max(ys))) or 1.0
    scale = _reward_scale(report)

    def sx(x):
        return pad + (x - x0) / ((x1 - x0) or 1.0) * (width - 2 * pad)

    def sy(y):
        return height / 2 - y / y_abs * (height / 2 - pad / 2)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="reward against base loss">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white" stroke="#ccc"/>',
        f'<line x1="{pad}" y1="{sy(0):.1f}" x2="{width - pad}" y2="{sy(0):.1f}" stroke="#999" stroke-dasharray="4"/>',
        f'<line x1="{pad}" y1="{pad / 2}" x2="{pad}" y2="{height - pad / 2}" stroke="#999"/>',
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="12">base loss -log p(x_i+1) [nats]</text>',
        f'<text x="14" y="{height / 2}" font-size="12" transform="rotate(-90 14 {height / 2})" text-anchor="middle">reward</text>',
        f'<text x="{pad - 4}" y="{pad / 2 + 4}" text-anchor="end" font-size="10">{y_abs:+.2g}</text>',
        f'<text x="{pad - 4}" y="{height - pad / 2}" text-anchor="end" font-size="10">{-y_abs:+.2g}</text>',
        f'<text x="{pad}" y="{height - pad / 2 + 12}" font-size="10">{x0:.2g}</text>',
        f'<text x="{width - pad}" y="{height - pad / 2 + 12}" text-anchor="end" font-size="10">{x1:.2g}</text>',
    ]
    for x, y, p in points:
        r, g, b = _reward_rgb(y, scale)
        tip = html.escape(f"#{p.index} {p.token!r}: reward {y:+.3f}, base loss {x:.3f}")
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="rgb({r},{g},{b})" stroke="#555"><title>{tip}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Inspection) -> str:
    """A self-contained HTML page (no scripts, no external resources)."""
    scale = _reward_scale(report)
    spans = []
    for p in report.positions:
        r, g, b = _reward_rgb(p.reward, scale)
        tip = f"#{p.index} thought: {p.thought!r}\nw = {p.mixing_weight:+.3f}  reward = {_fmt(p.reward)}  base loss = {_fmt(p.base_loss)}"
        spans.append(
            f'<span class="tok" id="t{p.index}" style="background:rgb({r},{g},{b})" title="{html.escape(tip)}">{_token_html(p.token)}</span>'
        )
    rows = []
    for p in report.positions:
        r, g, b = _reward_rgb(p.reward, scale)
        rows.append(
            f'<tr><td class="num">{p.index}</td><td>{html.escape(repr(p.token))}</td><td>{html.escape(repr(p.thought))}</td>'
            f'<td class="num">{p.mixing_weight:+.3f}</td><td class="num" style="background:rgb({r},{g},{b})">{_fmt(p.reward)}</td>'
            f'<td class="num">{_fmt(p.base_loss)}</td><td class="num">{_fmt(p.mixed_loss)}</td></tr>'
        )
    rewarded = report.rewarded
    mean_reward = sum(p.reward for p in rewarded) / len(rewarded) if rewarded else float("nan")
    helped = sum(p.reward > 0 for p in rewarded)
    title = f"Quiet-STaR thoughts{' — ' + report.model_name if report.model_name else ''}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p>N = {report.n_thought_tokens} thought tokens, K = {report.n_talk_tokens} scored tokens, "
            f"thought temperature {report.thought_temperature:g}. Reward = sum over the next K tokens of "
            "log p(with thought) - log p(base). Mean reward "
            f"{mean_reward:+.4f}; thinking helped at {helped} of {len(rewarded)} rewarded positions.</p>",
            '<p class="legend"><span style="background:rgb(40,170,60)">helped</span>'
            '<span style="background:rgb(215,50,40)">hurt</span><span style="background:rgb(235,235,235)">no reward (last K)</span>'
            f" saturation: |reward| / {scale:.3g}. Hover a token for its thought.</p>",
            f'<div class="text">{"".join(spans)}</div>',
            "<h2>Reward against base loss</h2>",
            _scatter_svg(report),
            "<h2>Every position</h2>",
            "<table><thead><tr><th>i</th><th>token</th><th>thought</th><th>w</th><th>reward</th><th>base loss</th>"
            "<th>mixed loss</th></tr></thead><tbody>",
            *rows,
            "</tbody></table></body></html>",
        ]
    )


# ---------------------------------------------------------------- terminal


def render_terminal(report: Inspection, color: bool = True) -> str:
    """One line per position; the token's background coloured by reward when ``color``."""
    scale = _reward_scale(report)
    lines = [f"{'i':>4}  {'token':<14} {'w':>7} {'reward':>8} {'base':>7}  thought"]
    for p in report.positions:
        token = repr(p.token)[:14]
        if color and p.reward is not None:
            r, g, b = _reward_rgb(p.reward, scale)
            token = f"\x1b[48;2;{r};{g};{b}m\x1b[30m{token:<14}\x1b[0m"
        else:
            token = f"{token:<14}"
        base = "n/a" if p.base_loss is None else f"{p.base_loss:.3f}"
        lines.append(f"{p.index:>4}  {token} {p.mixing_weight:>+7.3f} {_fmt(p.reward):>8} {base:>7}  {p.thought!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietstar-inspect", description="Per-position thoughts, mixing weights and rewards of a text.")
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text")
    source.add_argument("--file", help="a UTF-8 text file")
    p.add_argument("--output", default="quietstar_inspection.html", help="HTML report path ('-' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-color", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no terminal view")
    return p


def run(argv: list[str] | None = None) -> Inspection:
    """The command's work; returns the report (for scripts and tests)."""
    args = build_parser().parse_args(argv)
    text = args.text if args.text is not None else open(args.file, encoding="utf-8").read()
    model, tokenizer = load_from_args(args, "quietstar-inspect")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    report = inspect_text(model, tokenizer, text, generator=generator, model_name=args.model)
    if not args.quiet:
        print(render_terminal(report, color=not args.no_color and sys.stdout.isatty()))
    if args.output != "-":
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(render_html(report))
        rewarded = report.rewarded
        mean = sum(p.reward for p in rewarded) / len(rewarded) if rewarded else math.nan
        print(f"wrote {args.output}: {len(report.positions)} positions, mean reward {mean:+.4f}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0 on success."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
