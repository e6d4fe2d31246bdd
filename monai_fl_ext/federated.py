"""Federated runs end to end: run the FLARE job, evaluate its global model on the test sets, compare with central."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from monai_fl_ext.baseline import run_central
from monai_fl_ext.bundle import resolve_bundle, run_overrides
from monai_fl_ext.data.datalist import read_datalist
from monai_fl_ext.evaluation import evaluate_checkpoint
from monai_fl_ext.io import atomic_write_json, atomic_write_text, read_json
from monai_fl_ext.reporting import plot_convergence

FL_REPORT = "fl_report.json"
MODES = ("sim", "poc")


def run_federated(spec: Any, datalist: str | os.PathLike, mode: str = "sim", progress: bool = True) -> dict[str, Any]:
    """Run ``spec`` (a :class:`~monai_fl_ext.flare.job.FederatedJobSpec`) and report the global model's test AUC.

    Args:
        spec: the job.
        datalist: pooled datalist (its test split is the pooled test set).
        mode: ``sim`` (FLARE simulator) or ``poc`` (real processes over TLS on loopback).
        progress: show a progress bar over rounds.

    Returns:
        The report written to ``spec.output_dir/fl_report.json``: test macro/per-label AUC of the
        best global model, pooled and per site, the round history summary and the cross-site matrix.
    """
    from monai_fl_ext.flare.job import run_poc, run_simulation

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    server_dir = run_simulation(spec, progress=progress) if mode == "sim" else run_poc(spec, progress=progress)
    return federated_report(spec, datalist, server_dir, mode)


def evaluate_global_model(spec: Any, datalist: str | os.PathLike, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Test macro and per-label AUC of a global model of the job ``spec``, pooled and per site.

    Args:
        spec: the job whose bundle, overrides and partition the model was trained with.
        datalist: pooled datalist (its test split is the pooled test set).
        checkpoint: a state dict the bundle network loads (``best_global_model.pt``, ``final_global_model.pt``).

    Returns:
        :func:`~monai_fl_ext.evaluation.evaluate_checkpoint`'s ``{"pooled": ..., "per_site": ...}``.
    """
    bundle_root = resolve_bundle(spec.bundle)
    overrides = run_overrides(bundle_root, spec.dataset_dir, datalist, Path(spec.output_dir) / "eval_run", **spec.overrides)
    return evaluate_checkpoint(bundle_root, Path(checkpoint), overrides, read_datalist(datalist)["labels"], "test", Path(spec.partition_dir))


def federated_report(spec: Any, datalist: str | os.PathLike, server_dir: Path, mode: str) -> dict[str, Any]:
    """Evaluate the global model a finished run left in ``server_dir`` on the test sets and write the report.

    Args:
        spec: the job that ran.
        datalist: pooled datalist (its test split is the pooled test set).
        server_dir: the server's output folder (``history.json``, ``models/``).
        mode: how the job ran (recorded in the report).

    Returns:
        The report of :func:`run_federated`.
    """
    history = read_json(server_dir / "history.json")
    models = server_dir / "models"
    checkpoint = models / "best_global_model.pt" if (models / "best_global_model.pt").exists() else models / "final_global_model.pt"
    evaluation = evaluate_global_model(spec, datalist, checkpoint)
    report = {
        "task": "federated",
        "mode": mode,
        "algorithm": spec.algorithm,
        "quantization": spec.quantization,
        "num_rounds": spec.num_rounds,
        "local_epochs": spec.local_epochs,
        "status": history["status"],
        "checkpoint": str(checkpoint),
        "test": evaluation["pooled"],
        "per_site_test": evaluation["per_site"],
        "rounds": [{k: r.get(k) for k in ("round", "sites_ok", "sites_failed", "weights", "global_metrics", "update_norm", "payload_bytes", "wire_bytes",
                                         "privacy", "max_epsilon", "seconds")}
                   for r in history["rounds"]],
        "final_validation": history.get("final"),
        "privacy": _last_privacy(history),
        "cross_site": history.get("cross_site"),
        "server_outputs": str(server_dir),
    }
    atomic_write_json(Path(spec.output_dir) / FL_REPORT, report)
    return report


def _last_privacy(history: dict[str, Any]) -> dict[str, Any]:
    """Each site's latest cumulative privacy report (sites hold disjoint patients: the job's epsilon is the max)."""
    latest: dict[str, Any] = {}
    for r in history["rounds"]:
        latest.update(r.get("privacy") or {})
    return latest


def validation_curve(report: dict[str, Any], key: str = "val_auc") -> list[tuple[float, float]]:
    """(epochs of training, global validation metric) points of a federated report."""
    pts = [(r["round"] * report["local_epochs"], r["global_metrics"].get(key)) for r in report["rounds"] if r["global_metrics"]]
    final = (report.get("final_validation") or {}).get("global_metrics", {}).get(key)
    pts.append((report["num_rounds"] * report["local_epochs"], final))
    return [(x, y) for x, y in pts if y is not None and x > 0]


def run_compare(spec: Any, datalist: str | os.PathLike, algorithms: list[str], progress: bool = True) -> dict[str, Any]:
    """Central baseline and one federated run per algorithm on the same partition and total local epochs.

    Writes ``compare.json``, ``compare.md`` and ``convergence.png`` under ``spec.output_dir``.
    """
    out = Path(spec.output_dir)
    epochs = spec.num_rounds * spec.local_epochs
    central = run_central(spec.bundle, spec.dataset_dir, datalist, out / "central", epochs=epochs,
                          partition_dir=spec.partition_dir, overrides=spec.overrides, progress=progress)
    runs = {alg: run_federated(replace(spec, algorithm=alg, output_dir=str(out / alg), name=f"{spec.name}_{alg}"), datalist,
                               progress=progress) for alg in algorithms}
    central_auc = central["test"]["macro_auc"]
    summary = {
        "epochs": epochs,
        "central_test_macro_auc": central_auc,
        "federated": {alg: {"test_macro_auc": r["test"]["macro_auc"],
                            "ratio_to_central": (r["test"]["macro_auc"] / central_auc) if central_auc else None,
                            "per_site_test_macro_auc": {s: v["macro_auc"] for s, v in r["per_site_test"].items()},
                            "status": r["status"]} for alg, r in runs.items()},
        "central_per_site_test_macro_auc": {s: v["macro_auc"] for s, v in central["per_site_test"].items()},
    }
    best = max(runs, key=lambda a: runs[a]["test"]["macro_auc"] or 0.0) if runs else None
    summary["best_algorithm"] = best
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", compare_markdown(summary))
    curves = {f"FL {alg}": validation_curve(r) for alg, r in runs.items()}
    curves["central (validation)"] = [(h["epoch"], h.get("val_auc")) for h in central.get("validation_history", []) if h.get("val_auc") is not None]
    plot_convergence(curves, central_auc, out / "convergence.png")
    return summary


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def compare_markdown(summary: dict[str, Any]) -> str:
    """Side-by-side table of central vs federated test AUC, pooled and per site."""
    sites = sorted(summary["central_per_site_test_macro_auc"])
    lines = [f"# Federated vs central ({summary['epochs']} total local epochs)", "",
             "| run | test macro AUC | ratio to central | " + " | ".join(sites) + " |",
             "|---|---|---|" + "---|" * len(sites)]
    lines.append(f"| central | {_fmt(summary['central_test_macro_auc'])} | 1.0000 | "
                 + " | ".join(_fmt(summary["central_per_site_test_macro_auc"][s]) for s in sites) + " |")
    for alg, r in summary["federated"].items():
        lines.append(f"| FL {alg} | {_fmt(r['test_macro_auc'])} | {_fmt(r['ratio_to_central'])} | "
                     + " | ".join(_fmt(r["per_site_test_macro_auc"].get(s)) for s in sites) + " |")
    lines += ["", f"Best federated algorithm: **{summary['best_algorithm']}**.", "", "![convergence](convergence.png)", ""]
    return "\n".join(lines)


def run_privacy_sweep(spec: Any, datalist: str | os.PathLike, noise_multipliers: list[float], target_epsilon: float | None = 8.0,
                      delta: float = 1e-5, max_grad_norm: float = 1.0, progress: bool = True) -> list[dict[str, Any]]:
    """Privacy-utility trade-off: the federated job without DP, at each noise multiplier, and at ``target_epsilon``.

    Writes ``privacy_utility.csv`` and ``privacy_utility.png`` (final max epsilon over sites vs test macro AUC)
    under ``spec.output_dir``; each point records its settings and seed.

    Returns:
        One row per run: ``{"run", "noise_multiplier", "target_epsilon", "epsilon", "delta", "max_grad_norm",
        "test_macro_auc", "seed", "rounds", "local_epochs", "status"}``.
    """
    import csv
    import io

    out = Path(spec.output_dir)
    runs: list[tuple[str, dict | None]] = [("non-private", None)]
    runs += [(f"noise-{z:g}", {"noise_multiplier": z, "delta": delta, "max_grad_norm": max_grad_norm}) for z in noise_multipliers]
    if target_epsilon is not None:
        runs.append((f"target-eps-{target_epsilon:g}", {"target_epsilon": target_epsilon, "delta": delta, "max_grad_norm": max_grad_norm}))
    rows = []
    for name, privacy in runs:
        overrides = {**spec.overrides, "norm": "group"}  # one architecture for every point of the curve
        run_spec = replace(spec, privacy=privacy, overrides=overrides, output_dir=str(out / name), name=f"{spec.name}_{name}")
        report = run_federated(run_spec, datalist, progress=progress)
        eps = max((p["epsilon"] for p in report["privacy"].values()), default=None)
        sigma = {p["noise_multiplier"] for p in report["privacy"].values()}
        rows.append({"run": name, "noise_multiplier": ";".join(f"{z:.4f}" for z in sorted(sigma)) or "",
                     "target_epsilon": (privacy or {}).get("target_epsilon"), "epsilon": eps,
                     "delta": delta if privacy else None, "max_grad_norm": max_grad_norm if privacy else None,
                     "test_macro_auc": report["test"]["macro_auc"], "seed": spec.overrides.get("seed", 0),
                     "rounds": spec.num_rounds, "local_epochs": spec.local_epochs, "status": report["status"]})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "privacy_utility.csv", buf.getvalue())  # rewritten after each point: partial sweeps keep their data
    from monai_fl_ext.reporting import plot_privacy_utility

    plot_privacy_utility(rows, out / "privacy_utility.png", target_epsilon)
    return rows
