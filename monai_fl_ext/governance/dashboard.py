"""Compliance dashboard: one self-contained offline HTML file over a job's server output folder.

:func:`collect_job` gathers what a job left (history, registry, ledger, audit verdict) and says what is
missing; :func:`make_plots` draws the figures (the package's own privacy and drift plots plus metrics and
contributions); :func:`render_dashboard` embeds everything (inline CSS, PNG as base64) in one HTML page
that needs no server and no network.
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from monai_fl_ext.governance.audit import Verdict, verify_trail
from monai_fl_ext.governance.events import GOVERNANCE_DIR, TRAIL_FILE
from monai_fl_ext.governance.ledger import LEDGER_FILE
from monai_fl_ext.governance.registry import REGISTRY_FILE
from monai_fl_ext.io import read_json
from monai_fl_ext.reporting import plot_drift, plot_privacy_spend, save_figure

MODEL_FILES = ("best_global_model.pt", "final_global_model.pt")


def collect_job(server_dir: str | os.PathLike, public_key: Any = None) -> dict[str, Any]:
    """Everything a finished or running job left in its server output folder, and what is missing.

    Args:
        server_dir: the server output folder (``history.json``, ``models/``, ``governance/``).
        public_key: the server's audit public key (default: the copy next to the trail).

    Returns:
        ``{"server_dir", "history", "registry", "ledger", "verdict" (Verdict), "missing" (list of sentences),
        "status", "generated"}``; absent parts are None.
    """
    server = Path(server_dir)
    gov = server / GOVERNANCE_DIR
    missing: list[str] = []

    def optional_json(path: Path, what: str) -> Any:
        if not path.exists():
            missing.append(f"no {what} ({path} not found)")
            return None
        try:
            return read_json(path)
        except Exception as e:  # a report must say what is wrong, not crash
            missing.append(f"{what} unreadable: {e}")
            return None

    history = optional_json(server / "history.json", "round history")
    registry = optional_json(gov / REGISTRY_FILE, "model registry")
    ledger = optional_json(gov / LEDGER_FILE, "contribution ledger")
    verdict = verify_trail(gov / TRAIL_FILE, public_key)
    if not verdict.ok:
        missing.append(f"audit trail not verified: {verdict.reason}: {verdict.detail}")
    elif not verdict.complete:
        missing.append(f"audit trail has no job_end record (last event {verdict.last_event!r}): the job is running or ended abnormally")
    if verdict.ok and registry is not None:
        missing += cross_check(server, registry, verdict.path)
    status = (history or {}).get("status") or ((registry or {}).get("job") or {}).get("status") or "unknown"
    if status == "running":
        missing.append("the job is still running: this report covers the rounds finished so far")
    for name in MODEL_FILES:
        if not (server / "models" / name).is_file():
            missing.append(f"no {name.replace('_', ' ').removesuffix('.pt')} (models/{name} not found)")
    if registry is not None and not any(v["kind"] == "final" for v in registry.get("versions", [])):
        missing.append("no final model version in the registry")
    return {"server_dir": str(server), "history": history, "registry": registry, "ledger": ledger, "verdict": verdict,
            "missing": missing, "status": status, "generated": time.time()}


def cross_check(server: Path, registry: Mapping[str, Any], trail: str | os.PathLike) -> list[str]:
    """Disagreements between the (unsigned) registry, the signed trail and the model files on disk.

    Every version's hashes must equal those of its ``aggregated``/``model_saved`` record in the trail, and each
    checkpoint file must still hash to its latest registered version.

    Returns:
        One sentence per disagreement (empty when all agree).
    """
    from monai_fl_ext.governance.audit import read_records
    from monai_fl_ext.io import sha256_file

    signed = {r["fields"].get("version"): (r["seq"], r["fields"]) for r in read_records(trail)
              if r["event"] in ("aggregated", "model_saved") and r["fields"].get("version")}
    problems = []
    latest_per_file: dict[str, dict[str, Any]] = {}
    for v in registry.get("versions", []):
        if v.get("file"):
            latest_per_file[v["file"]] = v
        if v["kind"] == "initial":
            continue
        if v["version"] not in signed:
            problems.append(f"registry version {v['version']!r} has no aggregated/model_saved record in the audit trail")
            continue
        seq, fields = signed[v["version"]]
        for key in ("weights_sha256", "file_sha256"):
            if key in fields and fields[key] != v.get(key):
                problems.append(f"registry version {v['version']!r}: {key} differs from the signed audit trail (record {seq})")
    for rel, v in latest_per_file.items():
        path = server / rel
        if path.is_file() and sha256_file(path) != v.get("file_sha256"):
            problems.append(f"{rel} changed since it was registered as {v['version']!r} (SHA-256 differs)")
    return problems


# ---- plots ----------------------------------------------------------------------------------------
def _ledger_history(ledger: Mapping[str, Any]) -> dict[str, Any]:
    """A history-like dict from the ledger, so the package's privacy plot works without history.json."""
    rounds: dict[int, dict[str, Any]] = {}
    for e in ledger.get("entries", []):
        if isinstance(e.get("epsilon"), (int, float)):
            rounds.setdefault(e["round"], {"round": e["round"], "privacy": {}})["privacy"][e["site"]] = {
                "epsilon": e["epsilon"], "delta": e.get("delta", float("nan")), "budget_epsilon": e.get("budget_epsilon")}
    return {"rounds": [rounds[r] for r in sorted(rounds)]}


def _plot_metrics(history: Mapping[str, Any], path: Path) -> bool:
    rounds = [r for r in history.get("rounds", []) if r.get("global_metrics") or r.get("site_metrics")]
    keys = sorted({k for r in rounds for k in (r.get("global_metrics") or {})})
    if not rounds or not keys:
        return False
    fig = Figure(figsize=(6.5 * min(len(keys), 2), 3.8))
    axes = fig.subplots(1, min(len(keys), 2), squeeze=False)[0]
    for ax, key in zip(axes, keys[:2]):
        sites = sorted({s for r in rounds for s, m in (r.get("site_metrics") or {}).items() if key in m})
        for site in sites:
            pts = [(r["round"], r["site_metrics"][site][key]) for r in rounds if key in (r.get("site_metrics") or {}).get(site, {})]
            ax.plot(*zip(*pts), marker=".", alpha=0.7, label=site)
        pts = [(r["round"], r["global_metrics"][key]) for r in rounds if (r.get("global_metrics") or {}).get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), color="k", linewidth=2, marker="o", label="global (mean)")
        final = ((history.get("final") or {}).get("global_metrics") or {}).get(key)
        if final is not None:
            ax.axhline(final, color="tab:green", linestyle=":", label="final model")
        ax.set(title=f"{key} per round (model received)", xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _plot_contributions(ledger: Mapping[str, Any], path: Path) -> bool:
    entries = [e for e in ledger.get("entries", []) if e.get("status") == "accepted"]
    if not entries:
        return False
    fig = Figure(figsize=(12, 3.8))
    ax_norm, ax_samples = fig.subplots(1, 2)
    sites = sorted({e["site"] for e in entries})
    for site in sites:
        pts = sorted((e["round"], e.get("update_norm", e.get("reported_norm"))) for e in entries if e["site"] == site)
        pts = [(r, v) for r, v in pts if isinstance(v, (int, float))]
        if pts:
            ax_norm.plot(*zip(*pts), marker="o", label=site)
    ax_norm.set(title="update L2 norm per site (reported pre-masking under secure aggregation)", xlabel="round")
    ax_norm.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_norm.grid(alpha=0.3)
    ax_norm.legend(fontsize=7)
    samples = [sum(int(e.get("samples") or 0) for e in entries if e["site"] == s) for s in sites]
    steps = [sum(int(e.get("local_steps") or 0) for e in entries if e["site"] == s) for s in sites]
    x = range(len(sites))
    ax_samples.bar([i - 0.2 for i in x], samples, width=0.4, label="samples (sum over rounds)")
    ax_samples.bar([i + 0.2 for i in x], steps, width=0.4, label="local steps (sum)")
    ax_samples.set_xticks(list(x), sites)
    ax_samples.set_title("contribution per site")
    ax_samples.legend(fontsize=7)
    save_figure(fig, path)
    return True


def make_plots(job: Mapping[str, Any], folder: str | os.PathLike) -> dict[str, Path]:
    """Draw the job's figures as PNG files in ``folder``; a figure whose data is missing is skipped.

    Args:
        job: from :func:`collect_job`.
        folder: where the PNG files go.

    Returns:
        title -> PNG path, in display order.
    """
    folder = Path(folder)
    history, ledger = job.get("history"), job.get("ledger")
    plots: dict[str, Path] = {}
    attempts = [
        ("Privacy budget per site", "privacy.png",
         lambda p: plot_privacy_spend(history if history and any(r.get("privacy") for r in history.get("rounds", []))
                                      else _ledger_history(ledger or {}), p)),
        ("Validation metrics per round", "metrics.png", lambda p: _plot_metrics(history or {}, p)),
        ("Contributions", "contributions.png", lambda p: _plot_contributions(ledger or {}, p)),
        ("Update drift", "drift.png",  # needs the server to see each update: absent under secure aggregation
         lambda p: (plot_drift(history, p), p.exists())[1] if history and all("cosine" in r for r in history.get("rounds", [])
                                                                               if r.get("aggregated")) else False),
    ]
    for title, name, draw in attempts:
        path = folder / name
        path.unlink(missing_ok=True)  # never show a figure left by an earlier report
        try:
            if draw(path) is not False and path.exists():
                plots[title] = path
        except Exception as e:  # a figure with odd data must not stop the report
            job.setdefault("missing", []).append(f"plot {title!r} not drawn: {type(e).__name__}: {e}")
    return plots


# ---- HTML -----------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    """A value for a table cell: floats to ``digits`` significant digits, None as an en dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {fmt(v, digits)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in value)
    return str(value)


def job_facts(job: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the job summary shared by the dashboard and the PDF."""
    history, registry = job.get("history") or {}, job.get("registry") or {}
    info, config = registry.get("job") or {}, history.get("config") or (registry.get("job") or {}).get("config") or {}
    rounds = history.get("rounds", [])
    sites = sorted({s for r in rounds for s in r.get("sites_ok", [])} | {e["site"] for e in (job.get("ledger") or {}).get("entries", [])})
    secagg = config.get("secure_aggregation") or info.get("secure_aggregation") or "off"
    return [
        ("job id", registry.get("job_id") or "-"),
        ("server output", job["server_dir"]),
        ("status", job["status"]),
        ("algorithm", fmt(config.get("algorithm") or info.get("algorithm"))),
        ("rounds finished / planned", f"{sum(1 for r in rounds if r.get('aggregated'))} / {fmt(config.get('num_rounds'))}"),
        ("participants", ", ".join(sites) or "-"),
        ("aggregation weighting", fmt(config.get("weighting"))),
        ("secure aggregation", fmt(secagg)),
        ("client-level DP", fmt({k: config[k] for k in ("client_dp_clip", "client_dp_noise", "client_dp_delta") if k in config})
         if config.get("client_dp_clip") else "off"),
        ("audit trail", job["verdict"].message),
        ("report generated", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(job["generated"]))),
    ]


def privacy_rows(job: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per site the DP parameters and the epsilon after each round (from history, else ledger)."""
    history = job.get("history") or {}
    rounds = [r for r in history.get("rounds", []) if r.get("privacy")] or _ledger_history(job.get("ledger") or {})["rounds"]
    if not rounds:
        return [], []
    nums = [r["round"] for r in rounds]
    header = ["site", "noise mult.", "clip", "delta", "budget"] + [f"eps r{n}" for n in nums]
    rows = []
    for site in sorted({s for r in rounds for s in r["privacy"]}):
        last = next(r["privacy"][site] for r in reversed(rounds) if site in r["privacy"])
        rows.append([site, fmt(last.get("noise_multiplier")), fmt(last.get("max_grad_norm")), fmt(last.get("delta")), fmt(last.get("budget_epsilon"))]
                    + [fmt(r["privacy"].get(site, {}).get("epsilon")) for r in rounds])
    return header, rows


def version_rows(job: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model registry: version, round, parent, hashes, metrics, epsilon."""
    header = ["version", "round", "parent", "weights sha256", "file sha256", "metrics", "max eps"]
    rows = [[v["version"], fmt(v.get("round")), fmt(v.get("parent")), v.get("weights_sha256") or "-", v.get("file_sha256") or "-",
             fmt(v.get("metrics") or None), fmt((v.get("privacy") or {}).get("max_epsilon"))]
            for v in (job.get("registry") or {}).get("versions", [])]
    return header, rows


def lineage_lines(job: Mapping[str, Any]) -> list[str]:
    """One line per saved version (best/final): its chain of parents back to the first round."""
    versions = {v["version"]: v for v in (job.get("registry") or {}).get("versions", [])}
    lines = []
    for v in versions.values():
        if v["kind"] in ("initial", "round"):
            continue
        chain, cur, seen = [], v["version"], set()
        while cur is not None and cur in versions and cur not in seen:
            seen.add(cur)
            chain.append(cur)
            cur = versions[cur].get("parent")
        lines.append(" <- ".join(chain))
    return lines


def ledger_rows(job: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the contribution ledger, one row per site and round."""
    header = ["round", "site", "status", "update norm", "cos to agg.", "reported norm", "samples", "steps", "weight", "seconds", "epsilon", "reason"]
    entries = sorted((job.get("ledger") or {}).get("entries", []), key=lambda e: (e["round"], e["site"]))
    rows = [[str(e["round"]), e["site"], e["status"], fmt(e.get("update_norm")), fmt(e.get("cosine_to_aggregate")), fmt(e.get("reported_norm")),
             fmt(e.get("samples")), fmt(e.get("local_steps")), fmt(e.get("weight")), fmt(e.get("duration_s"), 3), fmt(e.get("epsilon")),
             fmt(e.get("reason"))] for e in entries]
    return header, rows


def metric_rows(job: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per round the global metrics and each site's, as measured on the model received."""
    history = job.get("history") or {}
    rounds = history.get("rounds", [])
    keys = sorted({k for r in rounds for k in (r.get("global_metrics") or {})})
    sites = sorted({s for r in rounds for s in (r.get("site_metrics") or {})})
    header = ["round"] + [f"global {k}" for k in keys] + [f"{s} {k}" for s in sites for k in keys]
    rows = [[str(r["round"])] + [fmt((r.get("global_metrics") or {}).get(k)) for k in keys]
            + [fmt((r.get("site_metrics") or {}).get(s, {}).get(k)) for s in sites for k in keys] for r in rounds]
    final = history.get("final")
    if final:
        rows.append(["final"] + [fmt((final.get("global_metrics") or {}).get(k)) for k in keys]
                    + [fmt((final.get("site_metrics") or {}).get(s, {}).get(k)) for s in sites for k in keys])
    return header, rows


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1b1f24;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:6px 0;background:#fff} th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f3f6} td.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:10px;word-break:break-all;max-width:260px}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600;margin:10px 0} .ok{background:#dafbe1;border:1px solid #4ac26b}
.bad{background:#ffebe9;border:1px solid #ff8182} .warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 14px;border-radius:6px}
img{max-width:100%;border:1px solid #d0d7de;background:#fff;margin:6px 0} .muted{color:#57606a;font-size:12px}
"""


def _table(header: list[str], rows: list[list[str]], hash_cols: tuple[int, ...] = ()) -> str:
    if not rows:
        return "<p class='muted'>no data</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=hash' if i in hash_cols else ''}>{html.escape(str(c))}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_dashboard(job: Mapping[str, Any], plots: Mapping[str, Path]) -> str:
    """The dashboard page: summary, audit verdict, missing parts, privacy, metrics, contributions, models, plots.

    Args:
        job: from :func:`collect_job`.
        plots: title -> PNG file (embedded as base64).

    Returns:
        The HTML text (no external resource: no script, stylesheet or image is fetched).
    """
    verdict: Verdict = job["verdict"]
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Governance dashboard - {e(job['server_dir'])}</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>Federated job: governance and compliance dashboard</h1>",
             f"<div class='muted'>{e(job['server_dir'])}</div>",
             f"<div class='verdict {'ok' if verdict.ok else 'bad'}' id='audit-verdict'>Audit trail: {e(verdict.message)}</div>"]
    if job.get("missing"):
        parts.append("<div class='warn' id='missing'><b>Incomplete or missing:</b><ul>"
                     + "".join(f"<li>{e(m)}</li>" for m in job["missing"]) + "</ul></div>")
    parts.append("<h2>Job summary</h2>" + _table(["item", "value"], [[k, v] for k, v in job_facts(job)]))
    parts.append("<h2>Privacy budget per site</h2>" + _table(*privacy_rows(job)))
    if "Privacy budget per site" in plots:
        parts.append(_img(plots["Privacy budget per site"], "privacy budget per site"))
    parts.append("<h2>Metrics per round (global and per site)</h2>" + _table(*metric_rows(job)))
    if "Validation metrics per round" in plots:
        parts.append(_img(plots["Validation metrics per round"], "metrics per round"))
    parts.append("<h2>Contributions (statistics only, never weights)</h2>" + _table(*ledger_rows(job)))
    for title in ("Contributions", "Update drift"):
        if title in plots:
            parts.append(_img(plots[title], title))
    parts.append("<h2>Model versions and lineage</h2>" + _table(*version_rows(job), hash_cols=(3, 4)))
    parts.append("<ul>" + "".join(f"<li><code>{e(line)}</code></li>" for line in lineage_lines(job)) + "</ul>")
    parts.append(f"<h2>Audit events</h2>{_table(['event', 'records'], [[k, str(v)] for k, v in sorted(verdict.events.items())])}"
                 f"<p class='muted'>verified with key {e(str(verdict.key_id))}; {verdict.records} records</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
