"""The report's PNG plots, drawn on the Agg canvas outside pyplot (no display, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tyr.data import CHANCE
from tyr.report.quality import TASK_NAMES, in_order

__all__ = [
    "plot_sparsity",
    "plot_fitness",
    "plot_accuracy",
    "plot_heal",
    "fitness_points",
    "matplotlib_ok",
]


def matplotlib_ok() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, outside pyplot (no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_sparsity(layers: list[dict[str, Any]], overall: float, path: Path) -> None:
    """Grouped bars: each block's attention and FFN sparsity, with the overall block sparsity."""
    from matplotlib.ticker import PercentFormatter

    idx = [int(r["index"]) for r in layers]
    fig = _figure(max(6.0, 0.32 * len(idx) + 2), 3.6)
    ax = fig.add_subplot()
    ax.bar([i - 0.2 for i in idx], [r["attn_sparsity"] for r in layers], 0.4, label="attention")
    ax.bar([i + 0.2 for i in idx], [r["mlp_sparsity"] for r in layers], 0.4, label="FFN")
    ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"all blocks ({overall:.1%})")
    ax.set_xlabel("block")
    ax.set_ylabel("parameters removed")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xticks(idx)
    ax.tick_params(axis="x", labelsize=7 if len(idx) > 24 else 9)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def fitness_points(iterations: list[dict[str, Any]]) -> int:
    return sum(len(it.get("parent_fitness") or []) for it in iterations)


def plot_fitness(iterations: list[dict[str, Any]], path: Path) -> None:
    """Parent fitness (top-k KL to the dense model) per generation, iterations end to end."""
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    start = 0
    for k, it in enumerate(iterations, 1):
        ys = [float(y) for y in it.get("parent_fitness") or []]
        xs = list(range(start + 1, start + len(ys) + 1))
        label = f"iteration {k} (step {it.get('step_attn', '?')} u / {it.get('step_mlp', '?')} ch)"
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if k > 1:
            ax.axvline(start + 0.5, color="grey", linewidth=0.8, linestyle=":")
        start += len(ys)
    ax.set_xlabel("generation (all iterations)")
    ax.set_ylabel("parent top-k KL (lower is better)")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_accuracy(dense: dict[str, float], pruned: dict[str, float], path: Path) -> None:
    """Grouped bars per task: dense and pruned accuracy, with the chance level marked."""
    from matplotlib.ticker import PercentFormatter

    tasks = in_order(set(dense) | set(pruned))
    fig = _figure(max(6.0, 0.9 * len(tasks) + 2), 3.6)
    ax = fig.add_subplot()
    xs = list(range(len(tasks)))
    for offset, (label, accs, color) in zip(
        (-0.2, 0.2), (("dense", dense, "tab:gray"), ("pruned", pruned, "tab:blue")), strict=True
    ):
        have = [i for i, t in enumerate(tasks) if t in accs]
        ax.bar([i + offset for i in have], [accs[tasks[i]] for i in have], 0.4, label=label, color=color)
    for i, t in enumerate(tasks):
        if t in CHANCE:
            ax.hlines(CHANCE[t], i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1)
    ax.plot([], [], color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(xs)
    ax.set_xticklabels([TASK_NAMES.get(t, t) for t in tasks], rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)


def plot_heal(curve: list[dict[str, Any]], path: Path) -> None:
    """Held-out perplexity of the curve points of `tyr heal` against training tokens."""
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    ax.plot(
        [p["tokens"] for p in curve], [p["ppl"] for p in curve], marker="o", markersize=3, label="student"
    )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (curve slice)")
    _save(fig, path)
