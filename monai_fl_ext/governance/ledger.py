"""Contribution ledger: what each site contributed in each round, as summary statistics only.

An entry holds the update's L2 norm, its cosine to the aggregate (only when the server sees plain updates;
under secure aggregation only what the site reports about itself, such as its pre-masking norm), samples,
local steps, duration, time and the site's cumulative epsilon. Entries accept scalars and short strings
only, so a raw weight, gradient or image cannot be stored by mistake; :func:`find_raw_updates` scans a
folder for any site's raw update bytes or printed values, the check behind the "no raw update" test.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_write_json, read_json

LEDGER_FILE = "ledger.json"
MAX_TEXT = 500
STAT_KEYS = ("update_norm", "cosine_to_aggregate", "reported_norm", "samples", "local_steps", "duration_s", "epsilon", "delta", "weight")


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _flat(update: Mapping[str, Any], keys: Iterable[str]) -> np.ndarray:
    parts = [_as_array(update[k]).astype(np.float64).ravel() for k in keys if np.issubdtype(_as_array(update[k]).dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def contribution_stats(update: Mapping[str, Any], aggregate: Mapping[str, Any] | None = None) -> dict[str, float | None]:
    """Summary statistics of one site's update (the server computes them when it sees plain updates).

    Args:
        update: the site's update (weight diff), name -> array/tensor; integer buffers are skipped.
        aggregate: the round's aggregated update; None (e.g. under secure aggregation) gives no cosine.

    Returns:
        ``{"update_norm": float, "cosine_to_aggregate": float | None}``.
    """
    keys = sorted(update)
    u = _flat(update, keys)
    out: dict[str, float | None] = {"update_norm": float(np.linalg.norm(u)), "cosine_to_aggregate": None}
    if aggregate is not None:
        a = _flat(aggregate, [k for k in keys if k in aggregate])
        if a.shape == u.shape and u.size:
            denom = float(np.linalg.norm(u) * np.linalg.norm(a))
            out["cosine_to_aggregate"] = float(u @ a / denom) if denom > 0 else None
    return out


def _scalar(site: str, rnd: int, name: str, value: Any) -> Any:
    """``value`` if it is a scalar or a short string, else an error naming site, round and field."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value) if isinstance(value, (float, np.floating)) else int(value)
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise InputError(f"ledger {site}, round {rnd}: field {name!r} is a {len(value)}-character string; "
                             f"only summaries up to {MAX_TEXT} characters are recorded")
        return value
    raise InputError(f"ledger {site}, round {rnd}: field {name!r} is a {type(value).__name__}; the ledger records scalars "
                     f"only, never weights, gradients or images")


class ContributionLedger:
    """Per-site, per-round contribution entries in ``<folder>/ledger.json`` (rewritten atomically).

    Args:
        folder: the governance folder.
        job_id: the job the entries belong to.
    """

    def __init__(self, folder: str | os.PathLike, job_id: str = "") -> None:
        self.path = Path(folder) / LEDGER_FILE
        self._lock = threading.Lock()
        self.data: dict[str, Any] = read_json(self.path) if self.path.exists() else {"job_id": job_id, "entries": []}
        if job_id and not self.data.get("job_id"):
            self.data["job_id"] = job_id

    @property
    def entries(self) -> list[dict[str, Any]]:
        """All entries, in the order recorded."""
        return self.data["entries"]

    def record(self, rnd: int, site: str, status: str, reason: str | None = None, timestamp: float | None = None,
               **stats: Any) -> dict[str, Any]:
        """Add or update the entry of ``site`` in round ``rnd``.

        Args:
            rnd: round number.
            site: site name.
            status: ``accepted``, ``rejected`` or ``dropped``.
            reason: why a contribution was rejected or dropped.
            timestamp: when the contribution arrived (seconds since the epoch).
            **stats: scalars such as ``update_norm``, ``cosine_to_aggregate``, ``reported_norm``, ``samples``,
                ``local_steps``, ``duration_s``, ``epsilon``, ``delta``, ``weight``.

        Returns:
            The entry.

        Raises:
            InputError: a statistic is not a scalar (an array, tensor, bytes or a long string).
        """
        fields = {k: _scalar(site, rnd, k, v) for k, v in stats.items()}
        with self._lock:
            entry = self.get(rnd, site)
            if entry is None:
                entry = {"round": int(rnd), "site": str(site)}
                self.entries.append(entry)
            entry.update({k: v for k, v in fields.items() if v is not None or k not in entry})
            entry["status"] = status
            if reason is not None:
                entry["reason"] = _scalar(site, rnd, "reason", reason)
            if timestamp is not None:
                entry["timestamp"] = float(timestamp)
            self.save()
            return dict(entry)

    def update(self, rnd: int, site: str, **stats: Any) -> None:
        """Add statistics to an existing entry (e.g. the cosine once the aggregate exists); no-op if absent."""
        with self._lock:
            entry = self.get(rnd, site)
            if entry is None:
                return
            entry.update({k: _scalar(site, rnd, k, v) for k, v in stats.items()})
            self.save()

    def get(self, rnd: int, site: str) -> dict[str, Any] | None:
        """The entry of ``site`` in round ``rnd``, or None."""
        return next((e for e in self.entries if e["round"] == rnd and e["site"] == site), None)

    def save(self) -> None:
        """Write the ledger atomically."""
        atomic_write_json(self.path, self.data)

    def per_site(self) -> dict[str, dict[str, Any]]:
        """Totals per site: rounds accepted/rejected/dropped, samples, steps, mean norm, last epsilon."""
        out: dict[str, dict[str, Any]] = {}
        for e in sorted(self.entries, key=lambda e: (e["site"], e["round"])):
            s = out.setdefault(e["site"], {"accepted": 0, "rejected": 0, "dropped": 0, "samples": 0, "local_steps": 0,
                                           "norms": [], "epsilon": None})
            s[e["status"]] = s.get(e["status"], 0) + 1
            if e["status"] == "accepted":
                s["samples"] += int(e.get("samples") or 0)
                s["local_steps"] += int(e.get("local_steps") or 0)
                norm = e.get("update_norm", e.get("reported_norm"))
                if isinstance(norm, (int, float)):
                    s["norms"].append(float(norm))
            if isinstance(e.get("epsilon"), (int, float)):
                s["epsilon"] = e["epsilon"]
        for s in out.values():
            norms = s.pop("norms")
            s["mean_update_norm"] = float(np.mean(norms)) if norms else None
        return out


# ---- the raw-update check ------------------------------------------------------------------------
@dataclass
class RawUpdateFinding:
    """A place where a site's raw update was found."""

    file: str
    site: str
    tensor: str
    how: str

    def __str__(self) -> str:
        return f"{self.file}: contains {self.site}'s update of {self.tensor!r} ({self.how})"


NUMBER = re.compile(rb"-?\d+\.\d{5,}(?:e[-+]?\d+)?")  # how Python and numpy print a float with many digits


def _needles(update: Mapping[str, Any], samples: int, min_bytes: int) -> tuple[list[tuple[str, str, bytes]], dict[bytes, tuple[str, str]]]:
    """Patterns that would betray ``update``.

    Returns:
        ``(raw, printed)``: raw = (tensor, how, bytes) runs of float32/float64/float16 values starting at the first
        non-zero element; printed = text of distinctive elements (8+ significant digits) -> (tensor, how).
    """
    raw, printed = [], {}
    for name in sorted(update):
        arr = _as_array(update[name])
        if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
            continue
        flat = arr.ravel()
        nonzero = np.flatnonzero(flat)
        if nonzero.size == 0:
            continue
        for dtype in (np.float32, np.float64, np.float16):
            size = np.dtype(dtype).itemsize
            values = flat[nonzero[0]:].astype(dtype)
            count = max(-(-min_bytes // size), 8 // size)
            if values.size < count or np.count_nonzero(values[: 8 // size]) < 8 // size:
                continue  # too short, or a key (first 8 bytes) with zeros would match by coincidence
            raw.append((name, f"raw {np.dtype(dtype).name} bytes from element {int(nonzero[0])}",
                        np.ascontiguousarray(values[:count]).astype(np.dtype(dtype).newbyteorder("<")).tobytes()))
        for i in np.flatnonzero(np.abs(flat) > 1e-4)[:samples]:
            v32 = np.float32(flat[i])
            for text in {repr(float(v32)), str(v32), repr(float(flat[i]))}:
                if sum(c.isdigit() for c in text.split("e")[0].lstrip("-0.")) >= 8:
                    printed[text.encode("ascii")] = (name, f"printed value {text} (element {int(i)})")
    return raw, printed


def _raw_matches(data: bytes, patterns: list[tuple[str, str, str, bytes]]) -> list[tuple[str, str, str]]:
    """(site, tensor, how) of the patterns found anywhere in ``data`` (any alignment), in linear passes.

    Each pattern's first 8 bytes are its key; every 8-byte word of the file, at each of the 8 offsets, is
    looked up in a 2**22-entry table of key bits (vectorised), and only the few candidates are compared.
    """
    if len(data) < 8 or not patterns:
        return []
    by_key: dict[int, list[tuple[str, str, str, bytes]]] = {}
    for p in patterns:
        by_key.setdefault(int.from_bytes(p[3][:8], "little"), []).append(p)
    mask = np.uint64((1 << 22) - 1)
    table = np.zeros(1 << 22, dtype=bool)
    table[np.fromiter(by_key, dtype=np.uint64) & mask] = True
    found = []
    for offset in range(8):
        words = np.frombuffer(data, dtype="<u8", count=(len(data) - offset) // 8, offset=offset)
        for i in np.flatnonzero(table[words & mask]):
            pos = offset + 8 * int(i)
            for site, tensor, how, pattern in by_key.get(int(words[i]), ()):
                if data[pos:pos + len(pattern)] == pattern:
                    found.append((site, tensor, how))
    return found


def find_raw_updates(folder: str | os.PathLike | Iterable[str | os.PathLike], updates: Mapping[str, Mapping[str, Any]],
                     samples: int = 8, min_bytes: int = 32) -> list[RawUpdateFinding]:
    """Scan every file under ``folder`` for any site's raw update, as bytes or as printed numbers.

    Looks, at any byte offset, for a run of ``min_bytes`` (at least 8 bytes) of each floating tensor of each
    update as float32, float64 and float16 (little-endian, from its first non-zero element), and for
    ``samples`` distinctive elements per tensor printed as Python/numpy print them (8+ significant digits)
    among the numbers written in the file. Compressed content (PNG, PDF streams, zip deflate) is scanned as
    stored; a plot of statistics is not a leak of weights.

    Args:
        folder: a folder (scanned recursively) or a list of folders/files.
        updates: site -> its update (name -> array/tensor).
        samples: printed elements checked per tensor.
        min_bytes: shortest byte run that counts as a match.

    Returns:
        One finding per (file, site, tensor); empty when nothing leaked.
    """
    roots = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    files = []
    for root in map(Path, roots):
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    raw, printed = [], {}
    for site, update in updates.items():
        r, p = _needles(update, samples, min_bytes)
        raw += [(site, *x) for x in r]
        printed.update({text: (site, *where) for text, where in p.items()})
    findings: list[RawUpdateFinding] = []
    seen = set()
    for f in files:
        data = f.read_bytes()
        hits = _raw_matches(data, raw) + [printed[t] for t in set(NUMBER.findall(data)) if t in printed]
        for site, tensor, how in hits:
            if (site, tensor) not in seen:
                seen.add((site, tensor))
                findings.append(RawUpdateFinding(str(f), site, tensor, how))
        seen.clear()
    return findings


def assert_no_raw_updates(folder: str | os.PathLike | Iterable[str | os.PathLike], updates: Mapping[str, Mapping[str, Any]],
                          **kwargs: Any) -> int:
    """Raise if any file under ``folder`` holds a site's raw update (see :func:`find_raw_updates`).

    Args:
        folder: folder(s) or file(s) to scan.
        updates: site -> its update.
        **kwargs: passed to :func:`find_raw_updates`.

    Returns:
        The number of files scanned.

    Raises:
        AssertionError: listing the files, sites and tensors found.
        InputError: nothing to scan (no files, or no floating tensor in the updates).
    """
    roots = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    files = [p for r in map(Path, roots) for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
    if not files:
        raise InputError(f"nothing to scan under {', '.join(map(str, roots))}")
    if not any(np.issubdtype(_as_array(v).dtype, np.floating) for u in updates.values() for v in u.values()):
        raise InputError("the updates hold no floating tensor to look for")
    findings = find_raw_updates(roots, updates, **kwargs)
    if findings:
        raise AssertionError("raw site updates found:\n" + "\n".join(map(str, findings)))
    return len(files)
