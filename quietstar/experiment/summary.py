"""The experiment's table: every row against the untouched base, on the same tokens, over seeds.

Per row and held-out text: mean NLL, the NLL of the hardest 10% of tokens (by the untouched base's
per-token NLL, so every row is judged on the same tokens), the difference of both from the untouched
base, the same by decile; the paper's metric; the inference cost per emitted token. Mean and
population standard deviation over training seeds.
"""

from __future__ import annotations

import statistics

import torch

from ..evaluation.heldout import by_decile

UNTOUCHED = "untouched base"
TEXT_TITLES = {"generated": "held-out problems from the training corpus's generator",
               "other_style": "human-written math in another style (other_style)"}


def mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def all_rows(results: dict) -> dict[str, list[dict]]:
    """Row label -> its rows over seeds, in table order (the untouched base first)."""
    rows = {UNTOUCHED: [results["base"]["rows"][UNTOUCHED]]}
    for run in results["runs"]:
        for label, row in run["rows"].items():
            rows.setdefault(label, []).append(row)
    return rows


def _text_summary(rows: list[dict], text: str, reference: torch.Tensor) -> dict:
    base_deciles = [d["nll"] for d in by_decile(reference, {"nll": reference})]
    base_mean = reference.mean().item()
    deciles = [[d["nll"] for d in by_decile(reference, {"nll": torch.tensor(row["per_token"][text], dtype=torch.float64)})]
               for row in rows]
    means = [statistics.fmean(row["per_token"][text]) for row in rows]
    return {
        "nll": mean_std(means),
        "hard_nll": mean_std([d[-1] for d in deciles]),
        "delta_nll": mean_std([m - base_mean for m in means]),
        "delta_hard_nll": mean_std([d[-1] - base_deciles[-1] for d in deciles]),
        "deciles": [mean_std([d[i] for d in deciles]) for i in range(len(base_deciles))],
        "delta_deciles": [mean_std([d[i] - base_deciles[i] for d in deciles]) for i in range(len(base_deciles))],
    }


def summarise(results: dict) -> dict:
    base = results["base"]["rows"][UNTOUCHED]
    texts = list(base["per_token"])
    references = {t: torch.tensor(base["per_token"][t], dtype=torch.float64) for t in texts}
    summary = {}
    for label, rows in all_rows(results).items():
        for row in rows:
            for t in texts:
                if len(row["per_token"][t]) != len(references[t]):
                    raise ValueError(f"row {label!r} scored {len(row['per_token'][t])} tokens of {t!r}, the untouched base "
                                     f"{len(references[t])}: rows must be scored on the same tokens")
        summary[label] = {
            "seeds": len(rows),
            "texts": {t: _text_summary(rows, t, references[t]) for t in texts},
            "metric": mean_std([row["metric"] for row in rows]),
            "forward_steps": mean_std([row["cost"]["forward_steps_per_token"] for row in rows]),
            "seconds_per_token": mean_std([row["cost"]["seconds_per_token"] for row in rows]),
        }
    return summary


def fmt(stat: dict, digits: int = 4, signed: bool = False) -> str:
    if stat["mean"] is None:
        return "-"
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{stat['mean']:{spec}}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def _header(results: dict) -> list[str]:
    cfg = results["config"]
    run = cfg["run"]
    base = results["base"]["rows"][UNTOUCHED]
    tokens = ", ".join(f"{t} {len(v)}" for t, v in base["per_token"].items())
    return [
        f"# {cfg['name']}",
        "",
        f"Model {run['model']['path']}; N {run['thought']['n_thought_tokens']}, K {run['thought']['n_talk_tokens']}, "
        f"P {run['thought']['n_passes']}, L {run['data']['seq_len']}; {run['optim']['steps']} steps of "
        f"{run['optim']['batch_size']} x {run['optim']['grad_accum']} sequences at lr {run['optim']['lr']}; "
        f"training seeds {cfg['training_seeds']} (mean ± population std over seeds); scored tokens: {tokens}; "
        f"thought seeds {cfg['heldout']['seeds']}; wall {results.get('wall_s', 0):.0f} s"
        + (" (summed over the merged parts)" if results.get("merged_from") else "") + ". Arm overrides: "
        + "; ".join(f"{name} {arm['overrides']}" for name, arm in cfg["arms"].items() if arm["enabled"])
        + (f"; students {cfg['students']['kinds']} from {cfg['students']['teachers']} with {cfg['students']['overrides']}"
           if cfg["students"]["kinds"] else "") + ".",
        "",
        "Cost: decoder forward calls per emitted token (counted) and seconds per emitted token (greedy, batch 1, "
        f"{cfg['cost']['prompt_tokens']}-token prompt, {cfg['cost']['new_tokens']} new tokens, this machine).",
    ]


def results_markdown(results: dict) -> str:
    summary = results["summary"]
    texts = list(next(iter(summary.values()))["texts"])
    lines = _header(results)
    lines += ["", "| row | seeds | steps / token | s / token | " + " | ".join(
        f"{t}: NLL | vs untouched | hardest 10% | vs untouched" for t in texts) + " | GSM8K-style metric |",
        "|---|---|---|---|" + "---|---|---|---|" * len(texts) + "---|"]
    for label, s in summary.items():
        cells = []
        for t in texts:
            ts = s["texts"][t]
            cells += [fmt(ts["nll"]), fmt(ts["delta_nll"], signed=True), fmt(ts["hard_nll"], 3), fmt(ts["delta_hard_nll"], 3, True)]
        lines.append(f"| {label} | {s['seeds']} | {fmt(s['forward_steps'], 1)} | {fmt(s['seconds_per_token'], 3)} | " + " | ".join(cells)
                     + f" | {fmt(s['metric'])} |")
    for t in texts:
        lines += ["", f"NLL minus the untouched base's, by decile of the untouched base's per-token NLL (10 = hardest), "
                      f"{TEXT_TITLES.get(t, t)}:", "", "| decile | untouched NLL | " + " | ".join(list(summary)[1:]) + " |",
                  "|---|---|" + "---|" * (len(summary) - 1)]
        base = summary[UNTOUCHED]["texts"][t]["deciles"]
        for i in range(len(base)):
            lines.append(f"| {i + 1} | {fmt(base[i], 3)} | " + " | ".join(
                fmt(s["texts"][t]["delta_deciles"][i], 3, True) for label, s in summary.items() if label != UNTOUCHED) + " |")
    return "\n".join(lines) + "\n"
