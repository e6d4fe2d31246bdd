"""Governance subcommands of ``monai-fl-ext``: ``audit-verify``, ``report``, ``registry``.

Kept here so ``cli.py`` only registers them (one call); each is a thin call into this package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from monai_fl_ext.errors import InputError


def _governance_dir(path: str) -> Path:
    """A governance folder given it or the server output folder that holds it."""
    from monai_fl_ext.governance.events import GOVERNANCE_DIR

    p = Path(path)
    return p / GOVERNANCE_DIR if (p / GOVERNANCE_DIR).is_dir() else p


def cmd_audit_verify(args: argparse.Namespace) -> None:
    """Verify a trail; exit status 1 when it is not intact (tampered, truncated, unreadable)."""
    from monai_fl_ext.governance.audit import load_public_key, verify_trail
    from monai_fl_ext.governance.events import TRAIL_FILE

    trail = Path(args.trail)
    if trail.is_dir():
        trail = _governance_dir(args.trail) / TRAIL_FILE
    if args.public_key:
        load_public_key(args.public_key)  # an unreadable key file is bad input (status 2), not a verdict
    verdict = verify_trail(trail, args.public_key)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2, sort_keys=True))
    else:
        print(verdict.message)
        if verdict.first_bad_line is not None:
            print(f"first bad record: seq {verdict.first_bad_seq} at line {verdict.first_bad_line}")
    if not verdict.ok:
        sys.exit(1)


def cmd_report(args: argparse.Namespace) -> None:
    """Write dashboard.html and audit_report.pdf for a job's server output folder."""
    from monai_fl_ext.governance.report import build_report

    result = build_report(args.server_dir, args.out, args.public_key)
    print(f"dashboard: {result['dashboard']}\nPDF: {result['pdf']}\naudit trail: {result['verdict']['message']}")
    for m in result["missing"]:
        print(f"missing: {m}")


def cmd_registry(args: argparse.Namespace) -> None:
    """List versions, walk a version's lineage, or export a version into a copy of its bundle."""
    from monai_fl_ext.governance.registry import ModelRegistry, export_version

    gov = _governance_dir(args.server_dir)
    registry = ModelRegistry.open(gov)
    if args.action == "list":
        for v in registry.versions:
            eps = (v.get("privacy") or {}).get("max_epsilon")
            print(f"{v['version']:<18} round {str(v.get('round')):>4}  parent {str(v.get('parent')):<14} "
                  f"weights {(v.get('weights_sha256') or '-')[:16]}  file {v.get('file') or '-'}"
                  + (f"  eps {eps:.3f}" if isinstance(eps, (int, float)) else "")
                  + (f"  {json.dumps(v['metrics'], sort_keys=True)}" if v.get("metrics") else ""))
        return
    if not args.version:
        raise InputError(f"registry {args.action}: --version is required (see 'registry list {args.server_dir}')")
    if args.action == "lineage":
        for v in registry.lineage(args.version):
            print(f"{v['version']}  (round {v.get('round')}, weights {v.get('weights_sha256') or '-'})")
        return
    if not args.out:
        raise InputError("registry export: --out is required (the new bundle folder)")
    out = export_version(gov, args.version, args.bundle, args.out, bump=args.bump, note=args.note)
    print(f"exported {args.version} to {out} (models/model.pt, models/model.ts, models/provenance.json; metadata version bumped)")


def add_governance_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register the governance subcommands with the CLI's ``add(name, func, help)`` helper."""
    p = add("audit-verify", cmd_audit_verify, "Verify a job's signed audit trail; names the first bad record. Exit 0: intact, 1: not.")
    p.add_argument("trail", help="audit_trail.jsonl, or the server output / governance folder holding it")
    p.add_argument("--public-key", help="the server's audit public key (PEM) kept by the consortium (default: the copy next to the trail)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")

    p = add("report", cmd_report, "Governance dashboard (one offline HTML file) and PDF audit report of a finished or running job.")
    p.add_argument("server_dir", help="the job's server output folder (OUT/server)")
    p.add_argument("--out", help="output folder (default SERVER_DIR/governance/report)")
    p.add_argument("--public-key", help="the server's audit public key (PEM)")

    p = add("registry", cmd_registry, "Model registry of a job: list versions, walk lineage, export a version into a bundle copy.")
    p.add_argument("action", choices=["list", "lineage", "export"])
    p.add_argument("server_dir", help="the job's server output folder (or its governance folder)")
    p.add_argument("--version", help="version id, e.g. final@round-7, best@round-5, round-3")
    p.add_argument("--bundle", default="chest_xray_classification", help="source bundle (name under bundles/ or a path)")
    p.add_argument("--out", help="with export: the new bundle folder")
    p.add_argument("--bump", choices=["major", "minor", "patch"], default="patch", help="metadata version bump")
    p.add_argument("--note", help="extra changelog text")

