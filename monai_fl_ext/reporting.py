"""Plots and markdown a person would rather look at than read: drift, convergence, FL vs central."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from monai_fl_ext.io import atomic_write_bytes


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as PNG atomically, without the variable Software metadata."""
    import io

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_drift(history: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Update norm per site over rounds, mean pairwise cosine over rounds, and the last round's cosine heatmap.

    Under secure aggregation the server never sees single updates: only the norms sites report are drawn.
    """
    rounds = [r for r in history["rounds"] if r.get("aggregated")]
    if not rounds:
        return
    secure = any("cosine" not in r for r in rounds)
    fig = Figure(figsize=(5 if secure else 13, 3.8))
    ax_norm, *rest = fig.subplots(1, 1 if secure else 3, squeeze=False)[0]
    sites = sorted({s for r in rounds for s in r["update_norm"]})
    for site in sites:
        pts = [(r["round"], r["update_norm"][site]) for r in rounds if site in r["update_norm"]]
        ax_norm.plot(*zip(*pts), marker="o", label=site)
    ax_norm.set(title="update L2 norm" + (" (site-reported, before masking)" if secure else ""), xlabel="round")
    ax_norm.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_norm.legend(fontsize=7)
    if secure:
        save_figure(fig, path)
        return
    ax_cos, ax_heat = rest
    mean_cos = []
    for r in rounds:
        c = np.asarray(r["cosine"])
        off = c[~np.eye(len(c), dtype=bool)]
        mean_cos.append((r["round"], float(off.mean()) if off.size else 1.0))
    ax_cos.plot(*zip(*mean_cos), marker="o")
    ax_cos.set(title="mean pairwise cosine of updates", xlabel="round", ylim=(-1, 1))
    last = rounds[-1]
    im = ax_heat.imshow(np.asarray(last["cosine"]), vmin=-1, vmax=1, cmap="coolwarm")
    ax_heat.set_xticks(range(len(last["sites"])), last["sites"], rotation=45, fontsize=7)
    ax_heat.set_yticks(range(len(last["sites"])), last["sites"], fontsize=7)
    ax_heat.set_title(f"cosine, round {last['round']}")
    fig.colorbar(im, ax=ax_heat)
    save_figure(fig, path)


def plot_privacy_spend(history: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Cumulative epsilon of each site over rounds and the maximum over sites (the job's guarantee).

    Returns:
        False when the run had no DP (nothing is written).
    """
    rounds = [r for r in history["rounds"] if r.get("privacy")]
    if not rounds:
        return False
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for site in sorted({s for r in rounds for s in r["privacy"]}):
        pts = [(r["round"], r["privacy"][site]["epsilon"]) for r in rounds if site in r["privacy"]]
        ax.plot(*zip(*pts), marker="o", label=site)
    ax.plot([r["round"] for r in rounds], [max(p["epsilon"] for p in r["privacy"].values()) for r in rounds],
            color="k", linestyle="--", label="max over sites")
    budget = next((p.get("budget_epsilon") for r in rounds for p in r["privacy"].values() if p.get("budget_epsilon")), None)
    if budget:
        ax.axhline(budget, color="tab:red", linestyle=":", label=f"budget {budget:g}")
    delta = next(iter(rounds[-1]["privacy"].values()))["delta"]
    ax.set(xlabel="round", ylabel=f"cumulative epsilon (delta {delta:g})", title="privacy spent per site")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def plot_convergence(curves: Mapping[str, Sequence[tuple[float, float]]], central: float | None, path: str | os.PathLike,
                     ylabel: str = "validation macro AUC") -> None:
    """Validation metric per round (or per epoch-equivalent) for each run, with the central test AUC as a line."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    if central is not None:
        ax.axhline(central, color="k", linestyle="--", label="central (test)")
        low, high = ax.get_ylim()  # axhline does not take part in autoscaling
        ax.set_ylim(min(low, central - 0.02), max(high, central + 0.02))
    ax.set(xlabel="epochs of local training (rounds x local epochs)", ylabel=f"{ylabel} (FL: mean over sites)",
           title="federated vs central")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_privacy_utility(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, target_epsilon: float | None = 8.0) -> None:
    """Final epsilon (max over sites) vs test macro AUC; the non-private run as a line, the target epsilon marked."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    private = sorted((r["epsilon"], r["test_macro_auc"], r["run"]) for r in rows if r["epsilon"] is not None and r["test_macro_auc"] is not None)
    if private:
        ax.plot([p[0] for p in private], [p[1] for p in private], marker="o", label="DP-SGD at every site")
        for eps, auc, name in private:
            ax.annotate(name, (eps, auc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in rows:
        if r["epsilon"] is None and r["test_macro_auc"] is not None:
            ax.axhline(r["test_macro_auc"], color="k", linestyle="--", label="non-private")
    if target_epsilon is not None:
        ax.axvline(target_epsilon, color="tab:red", linestyle=":", label=f"epsilon = {target_epsilon:g}")
    ax.set(xlabel="epsilon (max over sites)", ylabel="test macro AUC", title="privacy-utility trade-off")
    eps = [p[0] for p in private]
    if eps and max(eps) / max(min(eps), 1e-9) > 3:  # a log axis only helps when epsilons span a wide range
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
