"""Plots of an experiment's ``results`` (see :mod:`quietstar.experiment.runner`): PNG via matplotlib."""

from __future__ import annotations

from pathlib import Path

# Thinking runs log nll_base / nll_talk / mixing weights, students kl / nll (theirs) / teacher_nll.
TRAINING_TERMS = ("loss", "nll_base", "nll_talk", "policy_loss", "reward_mean", "mixing_weight_mean", "grad_norm",
                  "n_thought_tokens", "kl", "nll")
COLOURS = {"thinking": "tab:blue", "control": "tab:orange", "curriculum": "tab:green",
           "ntp_policy_from_thinking": "tab:red", "distill_from_thinking": "tab:purple",
           "ntp_policy_from_curriculum": "tab:brown", "distill_from_curriculum": "tab:pink"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'quietstar[experiment]'") from err
    return plt


def plot_curves(results: dict, path: str | Path) -> None:
    """Every training term against steps for both arms (one line per seed), and the held-out NLL."""
    plt = _pyplot()
    panels = [*TRAINING_TERMS, "held-out NLL", "held-out NLL, hardest 10%"]
    fig, axes = plt.subplots(3, 4, figsize=(20, 11))
    for ax, name in zip(axes.flat, panels):
        for arm in results["runs"]:
            colour, label = COLOURS.get(arm["arm"], "tab:gray"), f"{arm['arm']} seed {arm['seed']}"
            if name.startswith("held-out"):
                hard = "hardest" in name
                steps = [c["step"] for c in arm["curve"]]
                ax.plot(steps, [c["hard_nll_base" if hard else "nll_base"] for c in arm["curve"]], "--", color=colour,
                        label=f"{label}, base prediction")
                if arm["arm"] in ("thinking", "curriculum"):
                    ax.plot(steps, [c["hard_nll_thinking" if hard else "nll_thinking"] for c in arm["curve"]], "-",
                            color=colour, label=f"{label}, thinking")
            else:
                points = [(h["step"], h[name]) for h in arm["history"] if name in h]
                if points:
                    ax.plot(*zip(*points), color=colour, label=label, alpha=0.8)
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    axes.flat[len(panels) - 2].legend(fontsize=7)
    fig.suptitle(f"{results['config']['name']}: every run's training terms and held-out NLL (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _by_decile(results: dict, path: str | Path, field: str, *, deltas: bool) -> None:
    """One panel per held-out text: each row's ``field`` (a list of per-decile mean/std) against the
    untouched base's deciles; ``deltas``: differences from the untouched base (it is left out)."""
    plt = _pyplot()
    summary = results["summary"]
    texts = list(next(iter(summary.values()))["texts"])
    fig, axes = plt.subplots(1, len(texts), figsize=(8 * len(texts), 5.5), squeeze=False)
    for ax, text in zip(axes[0], texts):
        rows = [(name, row) for name, row in summary.items() if not (deltas and name == "untouched base")]
        for i, (name, row) in enumerate(rows):
            stats = row["texts"][text][field]
            x = [d + 1 + (i - len(rows) / 2) * 0.02 for d in range(len(stats))]  # small offsets keep error bars apart
            ax.errorbar(x, [d["mean"] for d in stats], yerr=[d["std"] or 0.0 for d in stats], marker="o", capsize=2,
                        label=name)
        if deltas:
            ax.axhline(0.0, color="black", linewidth=0.8)
            # Linear within +-0.05 nats, logarithmic beyond: a collapsed row (+5 nats) and a 0.01-nat gain both read.
            ax.set_yscale("symlog", linthresh=0.05)
        ax.set_xlabel("decile of the untouched base model's per-token NLL (10 = hardest)")
        ax.set_ylabel("NLL - untouched base NLL (nats, symlog; below 0 = better)" if deltas else "held-out NLL (nats)")
        ax.set_title(f"{'Difference from the untouched base' if deltas else 'Held-out NLL by difficulty'}: {text}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_deciles(results: dict, path: str | Path) -> None:
    """Final held-out NLL by decile of the untouched base's per-token NLL, one line per row (seed mean ± std)."""
    _by_decile(results, path, "deciles", deltas=False)


def plot_decile_deltas(results: dict, path: str | Path) -> None:
    """Each row's NLL minus the untouched base's, by decile (seed mean ± std): at this scale the absolute
    curves overlap and hide the differences."""
    _by_decile(results, path, "delta_deciles", deltas=True)
