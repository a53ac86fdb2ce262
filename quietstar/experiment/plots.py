"""Plots of an experiment's ``results`` (see :mod:`quietstar.experiment.runner`): PNG via matplotlib."""

from __future__ import annotations

from pathlib import Path

TRAINING_TERMS = ("loss", "nll_base", "nll_talk", "policy_loss", "reward_mean", "mixing_weight_mean", "grad_norm")
COLOURS = {"thinking": "tab:blue", "control": "tab:orange"}


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
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for ax, name in zip(axes.flat, panels):
        for arm in results["arms"]:
            colour, label = COLOURS[arm["arm"]], f"{arm['arm']} seed {arm['seed']}"
            if name.startswith("held-out"):
                hard = "hardest" in name
                steps = [c["step"] for c in arm["curve"]]
                ax.plot(steps, [c["hard_nll_base" if hard else "nll_base"] for c in arm["curve"]], "--", color=colour,
                        label=f"{label}, base prediction")
                if arm["arm"] == "thinking":
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
    fig.suptitle(f"{results['config']['name']}: Quiet-STaR (blue) vs plain-LM control (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_deciles(results: dict, path: str | Path) -> None:
    """Final held-out NLL by decile of the untouched base's per-token NLL, one line per model (seed mean)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in results["summary"].items():
        means = [d["mean"] for d in row["deciles"]]
        spread = [d["std"] or 0.0 for d in row["deciles"]]
        x = list(range(1, len(means) + 1))
        ax.errorbar(x, means, yerr=spread, marker="o", capsize=3, label=name)
    ax.set_xlabel("decile of the untouched base model's per-token NLL (10 = hardest)")
    ax.set_ylabel("held-out NLL (nats)")
    ax.set_title("Held-out NLL by difficulty")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
