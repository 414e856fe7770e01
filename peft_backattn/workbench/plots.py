"""Pictures of a run: the training loss curve, and the base against each head on every metric, as PNG files.

matplotlib is an optional extra (`pip install "peft-backattn[plots]"`); without it `plots_available()` is False
and the callers say how to get the pictures instead of drawing them. Figures are drawn on matplotlib's `Figure`
directly (no pyplot), so nothing global changes and no display is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

try:
    from matplotlib.figure import Figure
except ImportError:  # the optional extra is not installed
    Figure = None

INSTALL_HINT = 'pip install "peft-backattn[plots]"'
# The metrics drawn side by side, with the direction that is better, as EvalResult.to_dict() names them.
METRICS = {
    "perplexity": "lower is better",
    "exact_match": "higher is better",
    "rmse": "lower is better",
    "f1": "higher is better",
}


def plots_available() -> bool:
    return Figure is not None


def missing_plots_message() -> str:
    return f"matplotlib is not installed, so no pictures were drawn; {INSTALL_HINT} adds them."


def plot_loss_curve(losses: Sequence[float], path: str | os.PathLike, steps: Sequence[int] | None = None) -> Path:
    """The logged training losses against the optimiser step, as a PNG at `path`."""
    _require_matplotlib()
    steps = list(steps) if steps is not None else list(range(1, len(losses) + 1))
    figure = Figure(figsize=(6, 3.6), dpi=120)
    axes = figure.subplots()
    axes.plot(steps, list(losses), marker="." if len(losses) < 50 else None)
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("training loss (nats per target token)")
    axes.set_title("Training loss of the head")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_comparison(results: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike) -> Path:
    """One panel per metric, one bar per model (the base and each head), as a PNG at `path`.

    `results` maps a model's name to its metrics (EvalResult.to_dict()); metrics that are missing or not finite
    are left out of their panel.
    """
    _require_matplotlib()
    names = list(results)
    figure = Figure(figsize=(3.2 * len(METRICS), 3.4), dpi=120)
    for axes, (metric, direction) in zip(figure.subplots(1, len(METRICS)), METRICS.items(), strict=True):
        shown = [(n, results[n].get(metric)) for n in names]
        shown = [(n, float(v)) for n, v in shown if v is not None and math.isfinite(float(v))]
        axes.bar([n for n, _ in shown], [v for _, v in shown], color=[f"C{names.index(n)}" for n, _ in shown])
        for index, (_, value) in enumerate(shown):
            axes.annotate(f"{value:.3g}", (index, value), ha="center", va="bottom", fontsize=8)
        axes.set_title(f"{metric.replace('_', ' ')}\n({direction})", fontsize=10)
        axes.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.suptitle("Base against head on held-out problems")
    return _save(figure, path)


def _require_matplotlib() -> None:
    if Figure is None:
        raise RuntimeError(missing_plots_message())


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    """Written through a temporary name, so that an interrupted run leaves no half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
