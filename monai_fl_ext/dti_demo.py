"""The pharmaceutical consortium scenario: synthetic DTI data, 12 sites with skewed chemistry, central vs federated.

One call (``monai-fl-ext dti-consortium``) generates the synthetic drug-target data, featurises it, splits it
across sites by a Dirichlet skew over the compounds' scaffold families (each company holds some chemical series
more than others; all measurements of one compound stay at one site), trains the
``drug_target_interaction`` bundle centrally and federated under FLARE (optionally with DP-SGD at every site
and secure aggregation), and writes ``consortium_report.json`` and ``consortium_report.md`` with the pooled and
per-site test AUC, epsilon per site, the split of each round's wall time into site training and the rest
(orchestration, transfer, aggregation, masking), and the verdict on the job's signed audit trail.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monai_fl_ext.data.dti import SyntheticDTISpec, build_dti_dataset, generate_synthetic_dti
from monai_fl_ext.io import atomic_write_json, atomic_write_text, read_json
from monai_fl_ext.partition import write_partition

BUNDLE = "drug_target_interaction"
PARTITION_FIELD = "drug_family"
REPORT = "consortium_report"
# GroupNorm for every run, so the runs with and without DP share an architecture (and no BatchNorm statistics are
# averaged across sites with different chemistry); batch 16 because a site holds only 100-550 training pairs.
SCENARIO_OVERRIDES: dict[str, Any] = {"norm": "group", "batch_size": 16}
# The schedule that meets issue 8's utility target (docs/dti.md): FedAvgM (FedOpt, server SGD with momentum 0.9),
# 20 rounds x 5 local epochs. Each FedAvg round moves the global model about as far as one site's local steps (12 sites
# of 100-550 pairs), so the federated run needs many more local epochs than the central one, and server momentum.
SCENARIO_SCHEDULE: dict[str, Any] = {"rounds": 20, "local_epochs": 5, "algorithm": "fedopt", "server_optimizer": "sgd",
                                     "server_lr": 1.0, "server_momentum": 0.9}
# DP-SGD costs 3-10x the steps' time, and the noise per step grows with the number of steps at a fixed epsilon.
DP_SCHEDULE: dict[str, Any] = {"rounds": 5, "local_epochs": 3}


def prepare_dti(
    workdir: str | os.PathLike,
    spec: SyntheticDTISpec,
    num_sites: int = 12,
    alpha: float = 0.5,
    min_site_size: int = 20,
    partition_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path, Path]:
    """Generate and featurise a synthetic DTI data set and partition it by scaffold family.

    Args:
        workdir: data goes to ``workdir/data`` (CSV, features, datalist).
        spec: the synthetic data set.
        num_sites: consortium members.
        alpha: Dirichlet concentration of the scaffold-family skew (smaller: each site holds fewer families).
        min_site_size: fewest training pairs per site.
        partition_dir: where the partition goes (default ``workdir/partition``).

    Returns:
        ``(dataset_dir, datalist_path, partition_dir)``.

    Raises:
        InputError: a bad spec, or a partition that cannot give every site ``min_site_size`` training pairs.
    """
    dataset_dir = Path(workdir) / "data"
    csv_path = generate_synthetic_dti(dataset_dir, spec)
    build_dti_dataset(csv_path, dataset_dir, affinity="nM", seed=spec.seed)
    datalist = dataset_dir / "datalist.json"
    partition_dir = write_partition(datalist, partition_dir or Path(workdir) / "partition", num_sites=num_sites,
                                    strategy="dirichlet_field", alpha=alpha, seed=spec.seed, min_site_size=min_site_size,
                                    field=PARTITION_FIELD)
    return dataset_dir, datalist, Path(partition_dir)


def round_time_split(server_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Each round's wall time split into site training and the rest.

    ``seconds`` is the server's round time (history.json). Sites train in parallel, so the round's training
    time is the slowest site's ``train_seconds`` (evaluation of the received model, local training and the
    weight diff, measured at the site and recorded in the governance ledger as ``duration_s``); the rest is
    orchestration: task dispatch, transfer, secure-aggregation key exchange, masking and unmasking, aggregation.

    Args:
        server_dir: the job's server output folder.

    Returns:
        One ``{"round", "seconds", "train_seconds_max", "train_seconds_mean", "other_seconds", "train_share"}`` per
        round (training figures None when the ledger is missing).
    """
    server_dir = Path(server_dir)
    history = read_json(server_dir / "history.json")
    ledger_path = server_dir / "governance" / "ledger.json"
    durations: dict[int, list[float]] = {}
    if ledger_path.is_file():
        for entry in read_json(ledger_path).get("entries", []):
            if entry.get("status") == "accepted" and isinstance(entry.get("duration_s"), (int, float)):
                durations.setdefault(int(entry["round"]), []).append(float(entry["duration_s"]))
    rows = []
    for r in history["rounds"]:
        seconds = r.get("seconds")
        train = durations.get(int(r["round"]))
        t_max = max(train) if train else None
        rows.append({
            "round": r["round"],
            "seconds": seconds,
            "train_seconds_max": t_max,
            "train_seconds_mean": sum(train) / len(train) if train else None,
            "other_seconds": (seconds - t_max) if seconds is not None and t_max is not None else None,
            "train_share": (t_max / seconds) if seconds and t_max is not None else None,
        })
    return rows


def validation_curve(fl_report: dict[str, Any], key: str = "val_auc") -> list[dict[str, Any]]:
    """The global model's validation AUC (mean over sites) after each round, from a federated report.

    Rounds are numbered from 0 and sites evaluate the model they receive, so round ``r``'s metric belongs to the
    global model after ``r`` completed rounds; the final validation to the model after all of them. The server keeps
    the best of these as ``best_global_model.pt``, the model the test AUC is measured on.

    Args:
        fl_report: :func:`monai_fl_ext.federated.run_federated`'s report.
        key: the key metric.

    Returns:
        ``[{"after_round": r, "val_auc": v}, ...]`` for rounds after the first (round 0 is the initial model).
    """
    curve = [{"after_round": int(r["round"]), "val_auc": (r.get("global_metrics") or {}).get(key)} for r in fl_report["rounds"]]
    final = ((fl_report.get("final_validation") or {}).get("global_metrics") or {}).get(key)
    if fl_report["rounds"]:
        curve.append({"after_round": int(fl_report["rounds"][-1]["round"]) + 1, "val_auc": final})
    return [c for c in curve if c["after_round"] >= 1 and c["val_auc"] is not None]


def audit_verdict(server_dir: str | os.PathLike, key: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Verify the job's signed audit trail (``server/governance/audit_trail.jsonl``).

    Args:
        server_dir: the job's server output folder.
        key: the server's signing key or public key (PEM); default the public key stored next to the trail.

    Returns:
        The verdict as a dict (``ok``, ``reason``, ``message``, ``records``, ``events``...), or None without a trail.
    """
    from monai_fl_ext.governance import verify_trail
    from monai_fl_ext.governance.events import GOVERNANCE_DIR, TRAIL_FILE

    trail = Path(server_dir) / GOVERNANCE_DIR / TRAIL_FILE
    if not trail.is_file():
        return None
    return verify_trail(trail, key if key and Path(key).is_file() else None).to_dict()


def run_consortium(
    workdir: str | os.PathLike,
    spec: SyntheticDTISpec = SyntheticDTISpec(),
    num_sites: int = 12,
    alpha: float = 0.5,
    rounds: int = SCENARIO_SCHEDULE["rounds"],
    local_epochs: int = SCENARIO_SCHEDULE["local_epochs"],
    dp_epsilon: float | None = None,
    dp_delta: float = 1e-5,
    secure_agg: bool = False,
    mode: str = "sim",
    central: bool = True,
    algorithm: str = SCENARIO_SCHEDULE["algorithm"],
    overrides: dict[str, Any] | None = None,
    min_site_size: int = 20,
    progress: bool = True,
    server_optimizer: str = SCENARIO_SCHEDULE["server_optimizer"],
    server_lr: float = SCENARIO_SCHEDULE["server_lr"],
    server_momentum: float = SCENARIO_SCHEDULE["server_momentum"],
    central_epochs: int | None = None,
    central_threads: int | None = 1,
) -> dict[str, Any]:
    """The consortium scenario end to end; writes ``workdir/consortium_report.{json,md}``.

    Args:
        workdir: data, partition and runs go here.
        spec: the synthetic DTI data set.
        num_sites: consortium members (FLARE sites).
        alpha: Dirichlet concentration of the scaffold-family skew.
        rounds: federated rounds.
        local_epochs: local epochs per round (central trains rounds x local_epochs epochs).
        dp_epsilon: DP-SGD at every site with this target epsilon over the run (None: no DP).
        dp_delta: DP delta; must be below 1/N at every site.
        secure_agg: aggregate by pairwise masking (the server sees only the sum of the updates).
        mode: ``sim`` (FLARE simulator) or ``poc`` (one real process per site over TLS).
        central: also train the central baseline (same bundle settings, same total epochs).
        algorithm: ``fedavg``, ``fedprox`` or ``fedopt`` (server momentum SGD); SCAFFOLD needs each site's
            update and cannot run under secure aggregation.
        overrides: bundle overrides for both runs, on top of :data:`SCENARIO_OVERRIDES` (e.g. ``{"learning_rate": 0.002}``).
        min_site_size: fewest training pairs per site.
        progress: show progress bars.
        server_optimizer: FedOpt's server optimizer, ``sgd`` (momentum) or ``adam``.
        server_lr: FedOpt's server learning rate.
        server_momentum: FedOpt's server SGD momentum.
        central_epochs: epochs of the central baseline (None: ``rounds * local_epochs``, the same epochs of data
            every site sees); both runs are tested with their best-validation checkpoint.
        central_threads: torch threads of the central run (None: torch's default). One by default: on a shared
            machine torch's default of one thread per core oversubscribes it and runs several times slower.

    Returns:
        The report.

    Raises:
        InputError: bad parameters or data (the message names them).
    """
    from monai_fl_ext.baseline import run_central
    from monai_fl_ext.federated import run_federated
    from monai_fl_ext.baseline import torch_threads
    from monai_fl_ext.flare.job import FederatedJobSpec

    workdir = Path(workdir)
    central_epochs = central_epochs or rounds * local_epochs
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset_dir, datalist, partition_dir = prepare_dti(workdir, spec, num_sites, alpha, min_site_size)
    timings["prepare_s"] = time.perf_counter() - start
    overrides = {**SCENARIO_OVERRIDES, "seed": spec.seed, **(overrides or {})}
    privacy = {"target_epsilon": float(dp_epsilon), "delta": dp_delta} if dp_epsilon is not None else None
    if privacy:
        overrides["norm"] = "group"  # Opacus rejects BatchNorm
    tag = "fl" + ("" if algorithm == "fedavg" else f"-{algorithm}") + (f"-dp{dp_epsilon:g}" if privacy else "") + ("-secagg" if secure_agg else "")
    job = FederatedJobSpec(bundle=BUNDLE, dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                           output_dir=str(workdir / "runs" / tag), num_rounds=rounds, local_epochs=local_epochs, algorithm=algorithm,
                           server_optimizer=server_optimizer, server_lr=server_lr, server_momentum=server_momentum,
                           overrides=dict(overrides), privacy=privacy, secure_aggregation={} if secure_agg else None,
                           wait_time_after_min_received=120, name=f"dti_consortium_{tag.replace('-', '_').replace('.', '_')}")
    job.validate()  # before any training: bad DP or secure-aggregation settings fail fast
    central_report = None
    if central:
        t = time.perf_counter()
        with torch_threads(central_threads):
            central_report = run_central(BUNDLE, dataset_dir, datalist, workdir / "runs" / "central", epochs=central_epochs,
                                         partition_dir=partition_dir, overrides=overrides, progress=progress)
        timings["central_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fl = run_federated(job, datalist, mode=mode, progress=progress)
    timings["federated_s"] = time.perf_counter() - t
    server_dir = Path(fl["server_outputs"])
    split = round_time_split(server_dir)
    verdict = audit_verdict(server_dir, Path(job.output_dir) / "server_keys" / "audit_signing_key.pem")
    central_auc = central_report["test"]["macro_auc"] if central_report else None
    fl_auc = fl["test"]["macro_auc"]
    manifest = read_json(Path(partition_dir) / "manifest.json")
    trained = [r for r in split if r["train_seconds_max"] is not None]
    curve = validation_curve(fl)
    report = {
        "scenario": "drug-target interaction consortium",
        "spec": asdict(spec),
        "sites": num_sites,
        "partition": {"strategy": "dirichlet_field", "field": PARTITION_FIELD, "alpha": alpha, "dir": str(partition_dir),
                      "training_pairs": {s["name"]: s["items"]["training"] for s in manifest["sites"]}},
        "mode": mode,
        "algorithm": algorithm,
        "server_optimizer": {"name": server_optimizer, "lr": server_lr, "momentum": server_momentum} if algorithm == "fedopt" else None,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "central_epochs": central_epochs if central else None,
        "central_best_val_epoch": central_report.get("best_val_epoch") if central_report else None,
        "privacy": privacy,
        "secure_aggregation": secure_agg,
        "overrides": overrides,
        "status": fl["status"],
        "central_test_auc": central_auc,
        "federated_test_auc": fl_auc,
        "ratio_to_central": (fl_auc / central_auc) if central_auc and fl_auc is not None else None,
        "federated_validation_curve": curve,
        "federated_best_round": max(curve, key=lambda c: c["val_auc"])["after_round"] if curve else None,
        "per_site_test_auc": {s: {"federated": r["macro_auc"],
                                  "central": (central_report["per_site_test"].get(s) or {}).get("macro_auc") if central_report else None}
                              for s, r in fl["per_site_test"].items()},
        "epsilon_per_site": {s: p["epsilon"] for s, p in sorted(fl["privacy"].items())},
        "max_epsilon": max((p["epsilon"] for p in fl["privacy"].values()), default=None),
        "delta": dp_delta if privacy else None,
        "round_time_split": split,
        "mean_train_share": (sum(r["train_share"] for r in trained) / len(trained)) if trained else None,
        "audit_trail": verdict,
        "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
        "outputs": {"central": str(workdir / "runs" / "central") if central else None, "federated": job.output_dir},
    }
    atomic_write_json(workdir / f"{REPORT}.json", report)
    atomic_write_text(workdir / f"{REPORT}.md", report_markdown(report))
    return report


def _f(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def report_markdown(report: dict[str, Any]) -> str:
    """The consortium report as markdown: AUC table, epsilon per site, round time split, audit verdict."""
    privacy = report["privacy"]
    title = (f"# DTI consortium: {report['sites']} sites, {report['rounds']} rounds x {report['local_epochs']} local epochs, "
             f"{'DP-SGD target epsilon ' + _f(privacy['target_epsilon'], 1) if privacy else 'no DP'}, "
             f"{report.get('algorithm', 'fedavg')}{' with secure aggregation' if report['secure_aggregation'] else ''} ({report['mode']})")
    server = report.get("server_optimizer")
    server_text = f" Server optimizer: {server['name']}, lr {server['lr']:g}, momentum {server['momentum']:g}." if server else ""
    lines = [title, "", f"Status: {report['status']}. Partition: Dirichlet({report['partition']['alpha']}) over `{report['partition']['field']}`."
             + server_text, "",
             "| model | pooled test AUC | ratio to central |", "|---|---|---|",
             f"| central ({report.get('central_epochs')} epochs, best-validation checkpoint) | {_f(report['central_test_auc'])} | 1.0000 |",
             f"| federated | {_f(report['federated_test_auc'])} | {_f(report['ratio_to_central'])} |", "",
             "| site | training pairs | federated test AUC | central test AUC | epsilon |", "|---|---|---|---|---|"]
    for site, aucs in report["per_site_test_auc"].items():
        lines.append(f"| {site} | {report['partition']['training_pairs'].get(site)} | {_f(aucs['federated'])} | {_f(aucs['central'])} | "
                     f"{_f(report['epsilon_per_site'].get(site), 3)} |")
    if privacy:
        lines += ["", f"Max epsilon over sites: {_f(report['max_epsilon'], 3)} at delta {report['delta']} (sites hold disjoint compounds)."]
    lines += ["", "| round | round s | slowest site training s | other s (orchestration, transfer, masking, aggregation) | training share |",
              "|---|---|---|---|---|"]
    for r in report["round_time_split"]:
        lines.append(f"| {r['round']} | {_f(r['seconds'], 1)} | {_f(r['train_seconds_max'], 1)} | {_f(r['other_seconds'], 1)} | "
                     f"{_f(r['train_share'], 3)} |")
    lines += ["", f"Mean training share of the round: {_f(report['mean_train_share'], 3)}.", ""]
    verdict = report["audit_trail"]
    lines.append(f"Audit trail: {verdict['message']} ({verdict['records']} records)" if verdict else "Audit trail: none written by this job.")
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in report["wall_seconds"].items()), ""]
    return "\n".join(lines)
