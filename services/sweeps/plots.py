"""The comparison's plots: reward against quality along training, and the per-step norm ratio."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.sweeps.keys import ArmRuns, paired_keys

# comparison._series: (by, method, steps, keys) -> arm -> its seeds' curves
SeriesFn = Callable[[ArmRuns, str, int, tuple[str, ...]], dict[str, list]]

__all__ = ["plot_frontiers", "plot_ratios"]

_COLORS = {
    "none": "tab:red",
    "penalty": "tab:orange",
    "constraint": "tab:green",
    "kl": "tab:blue",
    "grpo_guard": "tab:purple",
    "renorm": "tab:gray",
}


def plot_frontiers(
    by: ArmRuns, methods: list[str], steps: int, path: Path, keys: tuple[str, ...], *, series: SeriesFn
) -> None:
    """Reward vs each paired metric along training, one curve per arm (``series``: ``comparison._series``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = paired_keys(keys)
    fig, axes = plt.subplots(len(methods), len(ys), figsize=(4 * len(ys), 3.3 * len(methods)), squeeze=False)
    for row, method in zip(axes, methods):
        for ax, k in zip(row, ys):
            for arm, seeds in series(by, method, steps, keys).items():
                curves = [c for _, c in seeds if c.get(k) and len(c[k]) == len(c["reward"])]
                if not curves:
                    continue
                n = min(len(c["reward"]) for c in curves)
                x = [sum(c["reward"][i] for c in curves) / len(curves) for i in range(n)]
                y = [sum(c[k][i] for c in curves) / len(curves) for i in range(n)]
                lo = [min(c[k][i] for c in curves) for i in range(n)]
                hi = [max(c[k][i] for c in curves) for i in range(n)]
                color = _COLORS.get(arm)
                ax.plot(x, y, marker="o", ms=3, label=arm, color=color, ls="--" if arm == "renorm" else "-")
                ax.fill_between(x, lo, hi, alpha=0.15, color=color)
            ax.set_title(f"{method}: {k} ({steps} steps)", fontsize=9)
            ax.set_xlabel("proxy reward (eval)", fontsize=8)
        row[0].legend(fontsize=7)
    fig.suptitle("reward vs quality along training: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ratios(by: ArmRuns, methods: list[str], path: Path) -> None:
    """The per-step norm ratio after training, per arm, with the bound ``1 + margin``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        margin = 0.0
        for (m, arm), rs in sorted(by.items()):
            curves = [r["ratio"] for r in rs if r["ratio"]]
            if m != method or not curves:
                continue
            margin = rs[0]["margin"] if arm == "constraint" else margin
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            color = _COLORS.get(arm)
            ax.plot(range(n), mean, label=arm, color=color)
            ax.fill_between(
                range(n),
                [min(c[i] for c in curves) for i in range(n)],
                [max(c[i] for c in curves) for i in range(n)],
                alpha=0.15,
                color=color,
            )
        ax.axhline(1.0 + margin, color="k", lw=0.8, ls=":", label="bound 1 + margin")
        ax.set_title(f"{method}: ||v|| / ||v_ref|| per sampling step", fontsize=9)
        ax.set_xlabel("sampling step (sigma 1 -> 0)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
