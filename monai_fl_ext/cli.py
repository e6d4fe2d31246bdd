"""``monai-fl-ext`` (or ``python -m monai_fl_ext``): one entry point, one subcommand per job.

Each subcommand is a thin call into the package's modules; bad input exits with status 2 and a
message naming the file, row or parameter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_fl_ext.errors import InputError


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override '{text}' must look like key=value, e.g. train#trainer#max_epochs=5")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_generate(args: argparse.Namespace) -> None:
    from monai_fl_ext.data.nih import build_nih_datalist
    from monai_fl_ext.data.synthetic import SyntheticSpec, generate_synthetic_cxr

    spec = SyntheticSpec(
        num_patients=args.patients,
        image_size=args.image_size,
        num_hospitals=args.hospitals,
        hospital_variation=not args.no_hospital_variation,
        seed=args.seed,
    )
    out = generate_synthetic_cxr(args.out, spec, progress=not args.quiet)
    datalist = build_nih_datalist(out, out_path=out / "datalist.json", seed=args.seed)
    print(f"wrote {out} and {out / 'datalist.json'}: " + ", ".join(f"{s} {len(datalist[s])}" for s in ("training", "validation", "test")))


def cmd_load_nih(args: argparse.Namespace) -> None:
    from monai_fl_ext.data.nih import build_nih_datalist

    out = Path(args.out or Path(args.root) / "datalist.json")
    datalist = build_nih_datalist(
        args.root, out_path=out, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        seed=args.seed, on_missing=args.on_missing, verify_images=not args.no_verify_images,
    )
    print(f"wrote {out}: " + ", ".join(f"{s} {len(datalist[s])}" for s in ("training", "validation", "test")))


def cmd_load_medmnist(args: argparse.Namespace) -> None:
    from monai_fl_ext.data.medmnist import materialise_chestmnist

    print(f"wrote {materialise_chestmnist(args.npz, args.out)}")


def cmd_partition(args: argparse.Namespace) -> None:
    from monai_fl_ext.partition import load_manifest, write_partition

    out = write_partition(
        args.datalist, args.out, num_sites=args.sites, strategy=args.strategy, alpha=args.alpha,
        seed=args.seed, min_site_size=args.min_site_size, field=args.field,
    )
    for site in load_manifest(out)["sites"]:
        print(f"{site['name']}: " + ", ".join(f"{k} {v}" for k, v in site["items"].items()))
    print(f"wrote {out} (manifest.json, histograms.json, histograms.png)")


def cmd_central(args: argparse.Namespace) -> None:
    from monai_fl_ext.baseline import run_central

    report = run_central(
        args.bundle, args.dataset_dir, args.datalist, args.out, epochs=args.epochs,
        partition_dir=args.partition, overrides=dict(args.override), progress=not args.quiet,
    )
    _print_json({"test_macro_auc": report["test"]["macro_auc"], "per_label_auc": report["test"]["per_label_auc"],
                 "per_site_test_macro_auc": {s: r["macro_auc"] for s, r in report["per_site_test"].items()},
                 "report": str(Path(args.out) / "central_report.json")})


def _site_weight(text: str) -> tuple[str, float]:
    site, _, weight = text.partition("=")
    try:
        return site, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"site weight '{text}' must look like site-3=2.0") from None


def _privacy(args: argparse.Namespace) -> dict | None:
    if args.dp_epsilon is None and args.dp_noise is None:
        return None
    settings = {"delta": args.dp_delta, "max_grad_norm": args.dp_clip}
    if args.dp_noise is not None:
        settings["noise_multiplier"] = args.dp_noise
    else:
        settings["target_epsilon"] = args.dp_epsilon
    if args.dp_budget is not None:
        settings["budget_epsilon"] = args.dp_budget
    settings["grad_sample_mode"] = args.dp_mode
    return settings


def _secure_aggregation(args: argparse.Namespace) -> dict | None:
    if not args.secure_agg:
        return None
    settings = {"bits": args.secagg_bits, "clip_range": args.secagg_clip, "max_weight": args.secagg_max_weight}
    if args.secagg_threshold is not None:
        settings["threshold"] = args.secagg_threshold
    return settings


def _job_spec(args: argparse.Namespace, algorithm: str | None = None):
    from monai_fl_ext.faults import FaultPlan
    from monai_fl_ext.flare.job import FederatedJobSpec

    return FederatedJobSpec(
        bundle=args.bundle, dataset_dir=args.dataset_dir, partition_dir=args.partition, output_dir=args.out,
        algorithm=algorithm or args.algorithm, num_rounds=args.rounds, local_epochs=args.local_epochs,
        min_clients=args.min_clients, fedprox_mu=args.mu, server_optimizer=args.server_opt, server_lr=args.server_lr,
        weighting=args.weighting, site_weights=dict(args.site_weight), train_timeout=args.timeout,
        wait_time_after_min_received=args.wait, overrides=dict(args.override), cross_site_eval=not args.no_cross_site,
        quantization=args.quantize, privacy=_privacy(args), name=args.name,
        client_dp={"clip": args.client_dp_clip, "noise_multiplier": args.client_dp_noise, "delta": args.dp_delta}
        if args.client_dp_clip else None,
        secure_aggregation=_secure_aggregation(args), aggregator=args.aggregator, max_update_norm=args.max_update_norm,
        max_norm_factor=args.max_norm_factor, version_policy=args.version_policy, clients_per_round=args.clients_per_round,
        data_policy=args.data_policy, check_images=args.check_images, resume=args.resume,
        initial_checkpoint=args.initial_checkpoint,
        faults=FaultPlan.load(args.faults).to_dict() if args.faults else None,
    )


def _print_fl(report: dict) -> None:
    print(f"\n=== federated {report['algorithm']} ({report['mode']}): {report['status']} ===")
    for r in report["rounds"]:
        failed = f"  left out: {r['sites_failed']}" if r["sites_failed"] else ""
        print(f"round {r['round']}: sites {r['sites_ok']} global val AUC {r['global_metrics'].get('val_auc')}{failed}")
    print(f"test macro AUC of the global model: {report['test']['macro_auc']}")
    if report.get("privacy"):
        print("privacy (epsilon per site, cumulative): " + ", ".join(f"{s}: {p['epsilon']:.3f}" for s, p in report["privacy"].items())
              + f"  -> max {max(p['epsilon'] for p in report['privacy'].values()):.3f} (delta {next(iter(report['privacy'].values()))['delta']})")
    for site, r in report["per_site_test"].items():
        print(f"  {site}: {r['macro_auc']}")


def cmd_federated(args: argparse.Namespace) -> None:
    spec = _job_spec(args)
    if args.mode == "export":
        from monai_fl_ext.flare.job import export_job

        path = export_job(spec, args.export_dir or Path(args.out) / "job")
        print(f"exported {path}\nrun it with:  nvflare simulator -w /tmp/ws -c {','.join(spec.sites())} -t {len(spec.sites())} {path}"
              f"\nor submit it: nvflare job submit -j {path}")
        return
    from monai_fl_ext.federated import run_federated

    _print_fl(run_federated(spec, args.datalist, mode=args.mode, progress=not args.quiet))
    print(f"report: {Path(args.out) / 'fl_report.json'}; TensorBoard: {Path(args.out) / 'server' / 'tensorboard'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from monai_fl_ext.federated import compare_markdown, run_compare

    summary = run_compare(_job_spec(args, "fedavg"), args.datalist, args.algorithms.split(","), progress=not args.quiet)
    print(compare_markdown(summary))
    print(f"written: {Path(args.out) / 'compare.md'}, compare.json, convergence.png")


def cmd_dp_sweep(args: argparse.Namespace) -> None:
    from monai_fl_ext.federated import run_privacy_sweep

    rows = run_privacy_sweep(_job_spec(args, args.algorithm), args.datalist, [float(z) for z in args.noise.split(",") if z],
                             target_epsilon=args.target_epsilon, delta=args.dp_delta, max_grad_norm=args.dp_clip, progress=not args.quiet)
    for r in rows:
        eps = "inf (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        print(f"{r['run']:>22}: epsilon {eps:>12}  test macro AUC {r['test_macro_auc']}")
    print(f"written: {Path(args.out) / 'privacy_utility.csv'}, privacy_utility.png")


def cmd_demo(args: argparse.Namespace) -> None:
    from monai_fl_ext.demo import run_demo
    from monai_fl_ext.federated import compare_markdown

    summary = run_demo(args.workdir, num_patients=args.patients, image_size=args.image_size, rounds=args.rounds,
                       local_epochs=args.local_epochs, algorithms=args.algorithms.split(","), num_sites=args.sites,
                       alpha=args.alpha, seed=args.seed, progress=not args.quiet, partitions_root=args.partitions_root)
    print("\n" + compare_markdown(summary))
    print(f"outputs: {Path(args.workdir) / 'runs'} (compare.md, convergence.png, central/, <algorithm>/server/)")


def cmd_stress(args: argparse.Namespace) -> None:
    from monai_fl_ext.data.synthetic import SyntheticSpec
    from monai_fl_ext.demo import prepare_synthetic
    from monai_fl_ext.flare.job import FederatedJobSpec
    from monai_fl_ext.stress import run_stress, stress_markdown

    work = Path(args.workdir)
    dataset_dir, datalist, partition_dir = prepare_synthetic(
        work / "data", SyntheticSpec(num_patients=args.patients, image_size=args.image_size, num_hospitals=3, seed=args.seed),
        args.sites, 0.5, progress=not args.quiet, min_site_size=5, partition_dir=work / "partition")
    spec = FederatedJobSpec(bundle=args.bundle, dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(work / args.scenario), num_rounds=args.rounds, local_epochs=args.local_epochs,
                            cross_site_eval=False,
                            overrides={"spatial_size": [args.image_size, args.image_size], "seed": args.seed},
                            wait_time_after_min_received=args.wait, name=f"stress_{args.scenario}")
    if args.repeats > 1:
        from monai_fl_ext.stress import repeated_markdown, run_stress_repeated

        print(repeated_markdown(run_stress_repeated(args.scenario, spec, datalist, args.repeats, progress=not args.quiet)))
        return
    print(stress_markdown(run_stress(args.scenario, spec, datalist, baseline=not args.no_baseline, progress=not args.quiet, seed=args.seed)))


def cmd_load_dti(args: argparse.Namespace) -> None:
    from monai_fl_ext.data.dti import Featurizer, build_dti_dataset

    datalist = build_dti_dataset(args.csv, args.out, affinity=args.affinity, threshold=args.threshold, seed=args.seed,
                                 featurizer=Featurizer(args.radius, args.bits, args.k), on_invalid=args.on_invalid)
    print(f"wrote {Path(args.out) / 'datalist.json'} and features/: " + ", ".join(f"{s} {len(datalist[s])}" for s in ("training", "validation", "test"))
          + f" (settings and skipped rows: {Path(args.out) / 'featurisation.json'})")


def cmd_dti_consortium(args: argparse.Namespace) -> None:
    from monai_fl_ext.data.dti import SyntheticDTISpec
    from monai_fl_ext.dti_demo import REPORT, report_markdown, run_consortium

    spec = SyntheticDTISpec(num_drugs=args.drugs, num_targets=args.targets, seed=args.seed)
    report = run_consortium(args.workdir, spec, num_sites=args.sites, alpha=args.alpha, rounds=args.rounds, local_epochs=args.local_epochs,
                            dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, secure_agg=args.secure_agg, mode=args.mode,
                            central=not args.no_central, algorithm=args.algorithm, overrides=dict(args.override), progress=not args.quiet,
                            server_optimizer=args.server_opt, server_lr=args.server_lr, server_momentum=args.server_momentum,
                            central_epochs=args.central_epochs)
    print("\n" + report_markdown(report) + f"\nreport: {Path(args.workdir) / (REPORT + '.json')} (and .md)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="monai-fl-ext",
        description="Federated, privacy-preserving training of MONAI bundles under NVIDIA FLARE.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("generate", cmd_generate, "Write a synthetic chest X-ray cohort in the NIH ChestX-ray14 layout, plus its datalist.json.")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--patients", type=int, default=500, help="number of patients (each has 1-6 images)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--hospitals", type=int, default=3, help="acquisition sites, each with its own contrast/noise profile")
    p.add_argument("--no-hospital-variation", action="store_true", help="render all hospitals alike")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("load-nih", cmd_load_nih, "Build a patient-wise datalist from a real NIH ChestX-ray14 download (CSV + image folders).")
    p.add_argument("root", help="folder with Data_Entry_2017.csv and images_*/ folders")
    p.add_argument("--out", help="datalist path (default ROOT/datalist.json)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients for validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients for test when no official lists exist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-missing", choices=["error", "skip"], default="error", help="what to do with CSV rows whose image is missing")
    p.add_argument("--no-verify-images", action="store_true", help="skip the PNG header check")

    p = add("load-medmnist", cmd_load_medmnist, "Materialise MedMNIST chestmnist.npz as PNG files plus a datalist.")
    p.add_argument("npz", help="path to chestmnist.npz (or chestmnist_64.npz ...)")
    p.add_argument("--out", required=True, help="output folder")

    p = add("partition", cmd_partition, "Split a datalist across N sites (patients never split) and write per-site datalists, manifest and histograms.")
    p.add_argument("datalist", help="pooled datalist JSON")
    p.add_argument("--out", required=True, help="partition folder, e.g. partitions/cxr-dirichlet-0.5")
    p.add_argument("--sites", type=int, default=3, help="number of sites (natural strategy: omit to use every value)")
    p.add_argument("--strategy", choices=["iid", "dirichlet", "quantity", "natural", "dirichlet_field"], default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-site-size", type=int, default=1, help="minimum training items per site")
    p.add_argument("--field", default="site", help="item field: the site for natural, the skewed feature for dirichlet_field")

    p = add("central", cmd_central, "Train a bundle centrally on the pooled training set and report test macro/per-label AUC as JSON.")
    p.add_argument("--bundle", default="chest_xray_classification", help="bundle name under bundles/ or a path")
    p.add_argument("--dataset-dir", required=True, help="folder the datalist's image paths are relative to")
    p.add_argument("--datalist", required=True, help="pooled datalist JSON")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--partition", help="partition folder: also report each site's test AUC")
    p.add_argument("--override", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="bundle config override, value as JSON, e.g. --override spatial_size=[128,128]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def add_federated_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", default="chest_xray_classification", help="bundle name under bundles/ or a path")
        p.add_argument("--dataset-dir", required=True, help="folder the datalists' image paths are relative to")
        p.add_argument("--datalist", required=True, help="pooled datalist (its test split is the pooled test set)")
        p.add_argument("--partition", required=True, help="partition folder; its sites are the job's sites")
        p.add_argument("--out", required=True, help="run folder (server history, TensorBoard, plots, checkpoints, site outputs)")
        p.add_argument("--rounds", type=int, default=8, help="federated rounds")
        p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
        p.add_argument("--min-clients", type=int, help="fewest sites a round needs (default: all)")
        p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
        p.add_argument("--server-opt", choices=["sgd", "adam"], default="sgd", help="FedOpt server optimizer")
        p.add_argument("--server-lr", type=float, default=1.0, help="FedOpt server learning rate")
        p.add_argument("--weighting", choices=["steps", "samples", "uniform"], default="steps", help="aggregation weights")
        p.add_argument("--site-weight", type=_site_weight, action="append", default=[], metavar="SITE=W",
                       help="explicit multiplier, e.g. --site-weight site-3=2.0 to up-weight a minority hospital")
        p.add_argument("--timeout", type=float, default=0, help="hard cap on a round in seconds (0: none)")
        p.add_argument("--wait", type=float, default=30, help="seconds to wait for the rest once min-clients answered")
        p.add_argument("--override", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                       help="bundle config override for every site, value as JSON")
        p.add_argument("--no-cross-site", action="store_true", help="skip the final cross-site evaluation")
        p.add_argument("--initial-checkpoint", metavar="MODEL.pt",
                       help="start the global model from this checkpoint, e.g. the `central` command's models/model.pt "
                            "trained on public data (DP fine-tuning keeps far more accuracy than DP training from scratch)")
        dp = p.add_argument_group("differential privacy (Opacus DP-SGD at every site; switches the bundle to GroupNorm)")
        dp.add_argument("--dp-epsilon", type=float, help="target epsilon over the whole run; the noise multiplier is derived")
        dp.add_argument("--dp-noise", type=float, help="noise multiplier (instead of --dp-epsilon)")
        dp.add_argument("--dp-delta", type=float, default=1e-5, help="delta; must be below 1/N for every site")
        dp.add_argument("--dp-clip", type=float, default=1.0, help="per-sample gradient clipping norm")
        dp.add_argument("--dp-budget", type=float, help="hard epsilon budget per site (default: the target); a site refuses a round past it")
        dp.add_argument("--dp-mode", choices=["mixed_ghost", "hooks"], default="mixed_ghost",
                        help="per-sample clipping: mixed ghost clipping for convolutions (fast, same step) or Opacus' hooks")
        dp.add_argument("--client-dp-clip", type=float, help="client-level DP (DP-FedAvg): clip each site's update to this L2 norm")
        dp.add_argument("--client-dp-noise", type=float, default=1.0, help="DP-FedAvg noise multiplier (with --client-dp-clip)")
        sa = p.add_argument_group("secure aggregation (pairwise masking: the server sees only the sum of the sites' updates)")
        sa.add_argument("--secure-agg", action="store_true", help="aggregate with the SecureAggregate workflow (X25519, ChaCha20 masks, Shamir recovery)")
        sa.add_argument("--secagg-bits", type=int, choices=[32, 64], default=32, help="fixed-point ring width: 32 (float32-sized messages) or 64")
        sa.add_argument("--secagg-clip", type=float, default=8.0, help="update coordinates are clipped to +-this before encoding")
        sa.add_argument("--secagg-max-weight", type=float, default=4096.0, help="largest aggregation weight (local steps or samples) a site may send")
        sa.add_argument("--secagg-threshold", type=int, help="t of n: fewest sites that can finish a round (default: a strict majority)")
        rb = p.add_argument_group("robustness and faults (docs/robustness.md)")
        rb.add_argument("--aggregator", choices=["mean", "median", "trimmed_mean", "norm_clip"], default="mean",
                        help="server aggregation; the robust ones need plain (not secure) aggregation")
        rb.add_argument("--max-update-norm", type=float, help="reject a site's update above this L2 norm")
        rb.add_argument("--max-norm-factor", type=float, default=100.0, help="reject an update above this many times the other sites' median norm (0: off)")
        rb.add_argument("--version-policy", choices=["refuse", "warn", "ignore"], default="refuse",
                        help="a site whose bundle or monai/torch/opacus/nvflare versions differ from the job's")
        rb.add_argument("--clients-per-round", type=float, help="sites drawn per round: a count, or a fraction below 1 (unreliable sites less often)")
        rb.add_argument("--data-policy", choices=["fail", "skip"], default="fail", help="a site's bad datalist items: sit out naming them, or skip them")
        rb.add_argument("--check-images", action="store_true", help="sites decode every image before joining")
        rb.add_argument("--faults", metavar="PLAN.json", help="fault plan for drills (monai_fl_ext.faults.FaultPlan as JSON)")
        rb.add_argument("--resume", action="store_true", help="continue an interrupted run of this job from its server checkpoint in --out")
        p.add_argument("--quantize", choices=["float16", "blockwise8", "float4", "normfloat4"],
                       help="quantise model updates both ways with FLARE's filters (bytes per round are reported)")
        p.add_argument("--name", default="monai_fl_ext", help="FLARE job name")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("federated", cmd_federated, "Train a bundle across the partition's sites under NVIDIA FLARE and report the global model's test AUC.")
    add_federated_args(p)
    p.add_argument("--algorithm", choices=["fedavg", "fedprox", "scaffold", "fedopt"], default="fedavg")
    p.add_argument("--mode", choices=["sim", "poc", "export"], default="sim",
                   help="sim: FLARE simulator; poc: real server/client processes over TLS on loopback; export: write a job folder")
    p.add_argument("--export-dir", help="with --mode export: where the job folder goes (default OUT/job)")

    p = add("compare", cmd_compare, "Central baseline vs federated algorithms on the same partition and total epochs: markdown table + convergence plot.")
    add_federated_args(p)
    p.add_argument("--algorithms", default="fedavg,fedprox,scaffold", help="comma-separated algorithms to run")

    p = add("dp-sweep", cmd_dp_sweep, "Privacy-utility curve: the federated job without DP and at each noise multiplier; CSV + PNG of epsilon vs test AUC.")
    add_federated_args(p)
    p.add_argument("--algorithm", choices=["fedavg", "fedprox", "scaffold", "fedopt"], default="fedavg")
    p.add_argument("--noise", default="0.6,1.0,2.0", help="comma-separated noise multipliers")
    p.add_argument("--target-epsilon", type=float, default=8.0, help="also run at this target epsilon (marked on the plot)")

    p = add("demo", cmd_demo, "Main job on synthetic data: generate, partition into 3 hospitals, train central and federated (FLARE simulator), print both AUCs.")
    p.add_argument("--workdir", default="workspace/demo", help="where data and runs go")
    p.add_argument("--patients", type=int, default=500)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8, help="federated rounds (central trains rounds x local epochs)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--algorithms", default="fedavg", help="comma-separated: fedavg,fedprox,scaffold,fedopt")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partitions-root", default="partitions", help="the partition is written under this folder")
    p.add_argument("--quiet", action="store_true")

    from monai_fl_ext.stress import SCENARIOS

    p = add("stress", cmd_stress, "Fault drill: the same federated job with and without a fault scenario; rounds completed, "
            "dropped/rejected contributions, wall time, AUC vs the fault-free run. Scenarios: "
            + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()))
    p.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    p.add_argument("--workdir", default="workspace/stress", help="data, partition and runs go here")
    p.add_argument("--bundle", default="chest_xray_classification")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round at every site")
    p.add_argument("--wait", type=float, default=10, help="seconds the server waits for stragglers once min_clients answered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    p.add_argument("--repeats", type=int, default=1,
                   help="run baseline and scenario with this many seeds (model init and fault draws) and judge the mean AUC difference")
    p.add_argument("--quiet", action="store_true")

    p = add("load-dti", cmd_load_dti, "Featurise a TDC-style DTI CSV (DAVIS, KIBA, BindingDB: Drug_ID,Drug,Target_ID,Target,Y) into .npy features + datalist.json.")
    p.add_argument("csv", help="the CSV")
    p.add_argument("--out", required=True, help="dataset folder (features/, datalist.json, featurisation.json)")
    p.add_argument("--affinity", choices=["nM", "p", "kiba"], default="nM", help="unit of Y: Kd/Ki/IC50 in nM (DAVIS, BindingDB), log scale, or KIBA score")
    p.add_argument("--threshold", type=float, help="label threshold on pKd (default 7) or the KIBA score (default 12.1)")
    p.add_argument("--radius", type=int, default=2, help="Morgan fingerprint radius")
    p.add_argument("--bits", type=int, default=1024, help="Morgan fingerprint bits")
    p.add_argument("--k", type=int, default=2, help="protein k-mer length (20**k features)")
    p.add_argument("--on-invalid", choices=["error", "skip"], default="error", help="rows with a bad SMILES, sequence or Y: stop, or skip and list them")
    p.add_argument("--seed", type=int, default=0, help="random pair split seed")

    from monai_fl_ext.dti_demo import SCENARIO_SCHEDULE

    p = add("dti-consortium", cmd_dti_consortium, "DTI consortium scenario: synthetic data, scaffold-skewed sites, central and federated (FLARE) DTI bundle; AUC, epsilon, round time split, audit.")
    p.add_argument("--workdir", default="workspace/dti", help="where data, partition, runs and the report go")
    p.add_argument("--drugs", type=int, default=160, help="synthetic compounds (8 scaffold families)")
    p.add_argument("--targets", type=int, default=36, help="synthetic proteins (6 families)")
    p.add_argument("--sites", type=int, default=12)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the scaffold-family skew")
    p.add_argument("--rounds", type=int, default=SCENARIO_SCHEDULE["rounds"])
    p.add_argument("--local-epochs", type=int, default=SCENARIO_SCHEDULE["local_epochs"])
    p.add_argument("--central-epochs", type=int, help="central baseline epochs (default rounds x local epochs); best-validation checkpoint")
    p.add_argument("--dp-epsilon", type=float, help="DP-SGD at every site with this target epsilon (GroupNorm for both runs)")
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--secure-agg", action="store_true", help="pairwise-masked secure aggregation")
    p.add_argument("--mode", choices=["sim", "poc"], default="sim", help="FLARE simulator or POC (real processes over TLS)")
    p.add_argument("--no-central", action="store_true", help="skip the central baseline")
    p.add_argument("--algorithm", choices=["fedavg", "fedprox", "fedopt"], default=SCENARIO_SCHEDULE["algorithm"],
                   help="fedopt: a server optimizer on the mean update (FedAvgM with sgd)")
    p.add_argument("--server-opt", choices=["sgd", "adam"], default=SCENARIO_SCHEDULE["server_optimizer"], help="fedopt's server optimizer")
    p.add_argument("--server-lr", type=float, default=SCENARIO_SCHEDULE["server_lr"], help="fedopt's server learning rate")
    p.add_argument("--server-momentum", type=float, default=SCENARIO_SCHEDULE["server_momentum"], help="fedopt's server SGD momentum")
    p.add_argument("--override", type=_parse_override, action="append", default=[], metavar="KEY=VALUE", help="bundle config override for both runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    from monai_fl_ext.governance.commands import add_governance_commands  # audit-verify, report, registry

    add_governance_commands(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (InputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
