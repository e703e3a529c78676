"""PNG plots of a run (matplotlib, imported lazily): CCA over epochs, gate heatmap, loss curves.

Each PNG is written atomically (a temporary file, then ``os.replace``): an interrupted run leaves a
whole plot or none, and ``pretrain.py --resume`` re-creates the missing ones of a finished run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["plot_cca", "plot_gates", "plot_losses", "plot_run"]


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('plots need matplotlib: pip install "star-heads[examples]"') from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_cca(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Mean canonical correlation CCA(inv, eq) per epoch, with the shuffled-pairs null baseline."""
    rows = [r for r in rows if r.get("cca_mean") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ep = [r["epoch"] for r in rows]
    ax.plot(ep, [r["cca_mean"] for r in rows], marker="o", label="CCA(inv, eq)")
    if any(r.get("cca_null") is not None for r in rows):
        ax.plot(ep, [r.get("cca_null") for r in rows], ls="--", color="grey", label="null baseline")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean canonical correlation")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_gates(gate_mean: list[list[float]], tasks: list[str], path: str | Path) -> Path | None:
    """Heatmap of the mean gate per expert (rows) and task (columns) on the held-out set."""
    if not gate_mean:
        return None
    plt = _plt()
    import numpy as np

    g = np.asarray(gate_mean, dtype=float).T  # [N, T]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * g.shape[1], 1.2 + 0.32 * g.shape[0]))
    im = ax.imshow(g, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(g.shape[1]), tasks)
    ax.set_yticks(range(g.shape[0]), [f"E{k}" for k in range(g.shape[0])])
    ax.set_xlabel("task")
    ax.set_ylabel("expert")
    for (i, j), v in np.ndenumerate(g):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < g.max() / 2 else "k", fontsize=7)
    fig.colorbar(im, ax=ax, label="mean gate")
    fig.tight_layout()
    return _save(fig, path)


def plot_losses(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Each loss term (``loss`` and every ``loss_*`` key) per epoch."""
    if not rows:
        return None
    keys = [k for k in rows[-1] if k == "loss" or k.startswith("loss_")]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in keys:
        ax.plot([r["epoch"] for r in rows], [r.get(k) for r in rows], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (epoch mean)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run_dir: str | Path, rows: list[dict[str, Any]], tasks: list[str]) -> list[Path]:
    """Writes cca.png, gates.png (last epoch's gates) and losses.png into ``run_dir``."""
    run_dir = Path(run_dir)
    out = [
        plot_cca(rows, run_dir / "cca.png"),
        plot_gates(rows[-1].get("gate_mean") if rows else None, tasks, run_dir / "gates.png"),
        plot_losses(rows, run_dir / "losses.png"),
    ]
    return [p for p in out if p is not None]
