"""PDF audit report (fpdf2) and the one entry point that writes both the dashboard and the PDF.

:func:`build_report` reads a finished or still-running job's server output folder and writes
``dashboard.html`` (self-contained) and ``audit_report.pdf`` (job summary, participants, DP parameters
and epsilon per site, secure aggregation settings, model versions with hashes, lineage, the audit
verdict and the plots). Whatever is missing (no final model, trail truncated, job still running) is
listed at the top of both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from monai_fl_ext.governance.dashboard import (
    collect_job,
    job_facts,
    ledger_rows,
    lineage_lines,
    make_plots,
    metric_rows,
    privacy_rows,
    render_dashboard,
    version_rows,
)
from monai_fl_ext.governance.events import GOVERNANCE_DIR
from monai_fl_ext.io import atomic_write_bytes, atomic_write_json, atomic_write_text

DASHBOARD = "dashboard.html"
PDF = "audit_report.pdf"
SUMMARY = "report_summary.json"


def _latin1(text: Any) -> str:
    """Text the PDF core fonts can show (epsilon, arrows and other non-Latin-1 characters spelled out)."""
    text = str(text).replace("ε", "epsilon").replace("δ", "delta").replace("←", "<-").replace("→", "->").replace("–", "-").replace("—", "-")
    return text.encode("latin-1", "replace").decode("latin-1")


def write_pdf(job: dict[str, Any], plots: dict[str, Path], path: str | os.PathLike) -> Path:
    """Write the PDF audit report atomically.

    Args:
        job: from :func:`~monai_fl_ext.governance.dashboard.collect_job`.
        plots: title -> PNG file.
        path: destination PDF.

    Returns:
        The PDF path.
    """
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_creator("monai_fl_ext governance")
    pdf.set_title("Federated job audit report")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def heading(text: str) -> None:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 12)
        pdf.cell(0, 7, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 8)

    def para(text: str, style: str = "", size: float = 8, color: tuple[int, int, int] = (0, 0, 0)) -> None:
        pdf.set_font("Helvetica", style, size)
        pdf.set_text_color(*color)
        pdf.multi_cell(width, 4.2, _latin1(text), new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0, 0, 0)

    def table(header: list[str], rows: list[list[str]], size: float = 7, widths: tuple[float, ...] | None = None,
              mono: tuple[int, ...] = ()) -> None:
        if not rows:
            para("no data", "I")
            return
        pdf.set_font("Helvetica", "", size)
        with pdf.table(col_widths=widths, text_align="LEFT", line_height=size * 0.5, width=width,
                       headings_style=FontFace(emphasis="BOLD", fill_color=(235, 239, 243))) as t:
            for cells in [header, *rows]:
                row = t.row()
                for i, c in enumerate(cells):
                    row.cell(_latin1(c), style=FontFace(family="Courier", size_pt=size - 1.5) if i in mono and cells is not header else None)

    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 9, "Federated job audit report", new_x="LMARGIN", new_y="NEXT")
    verdict = job["verdict"]
    para(f"Audit trail: {verdict.message}", "B", 9, (0, 110, 40) if verdict.ok else (180, 0, 0))
    if job.get("missing"):
        heading("Incomplete or missing")
        for m in job["missing"]:
            para(f"- {m}", color=(150, 90, 0))
    heading("Job summary")
    table(["item", "value"], [[k, v] for k, v in job_facts(job)], widths=(1, 3))
    heading("Differential privacy per site (epsilon after each round)")
    table(*privacy_rows(job))
    heading("Metrics per round (measured by the sites on the model they received)")
    header, rows = metric_rows(job)
    table(header[:9], [r[:9] for r in rows])
    heading("Model versions")
    header, rows = version_rows(job)
    table(header, rows, size=6.5, widths=(14, 6, 12, 27, 27, 18, 8), mono=(3, 4))
    heading("Lineage")
    for line in lineage_lines(job) or ["no saved model version"]:
        para(line, size=8)
    heading("Contribution ledger (statistics only)")
    table(*ledger_rows(job), size=6)
    for title, png in plots.items():
        if pdf.get_y() > pdf.h - 90:
            pdf.add_page()
        heading(title)
        from PIL import Image

        with Image.open(png) as im:  # drawn at 110 dpi: show at 80% of natural size, at most the page width
            pdf.image(str(png), w=min(width, im.width / 110 * 25.4 * 0.8))
    heading("Audit events")
    table(["event", "records"], [[k, str(v)] for k, v in sorted(verdict.events.items())], widths=(3, 1))
    para(f"verified with key {verdict.key_id}; {verdict.records} records; trail {verdict.path}", size=7)
    return atomic_write_bytes(path, bytes(pdf.output()))


def build_report(server_dir: str | os.PathLike, out: str | os.PathLike | None = None, public_key: Any = None) -> dict[str, Any]:
    """Write the dashboard and the PDF audit report of a job (finished or still running).

    Args:
        server_dir: the job's server output folder.
        out: output folder (default ``<server_dir>/governance/report``).
        public_key: the server's audit public key (PEM path); default the copy next to the trail.

    Returns:
        ``{"dashboard", "pdf", "summary", "plots", "verdict" (dict), "missing" (list), "status"}``.

    Raises:
        InputError: the public key given cannot be read.
    """
    from monai_fl_ext.errors import InputError
    from monai_fl_ext.governance.audit import load_public_key

    server = Path(server_dir)
    if not server.is_dir():
        raise InputError(f"{server}: server output folder not found")
    if public_key is not None:
        load_public_key(public_key)  # a wrong path is the user's error, not the trail's
    out = Path(out) if out is not None else server / GOVERNANCE_DIR / "report"
    out.mkdir(parents=True, exist_ok=True)
    job = collect_job(server, public_key)
    tmp = Path(tempfile.mkdtemp(prefix=".plots.", dir=out))
    try:
        plots = make_plots(job, tmp)
        pdf = write_pdf(job, plots, out / PDF)
        dashboard = atomic_write_text(out / DASHBOARD, render_dashboard(job, plots))
        for png in plots.values():
            atomic_write_bytes(out / png.name, png.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"server_dir": str(server), "status": job["status"], "verdict": job["verdict"].to_dict(), "missing": job["missing"],
               "dashboard": str(dashboard), "pdf": str(pdf), "plots": sorted(p.name for p in plots.values())}
    atomic_write_json(out / SUMMARY, summary)
    return {**summary, "summary": str(out / SUMMARY)}
