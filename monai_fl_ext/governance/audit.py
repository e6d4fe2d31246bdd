"""Append-only, hash-chained, Ed25519-signed audit trail (JSON lines) and its verifier.

Each line is one record::

    {"seq": 3, "time": 1796423984.1, "event": "round_start", "fields": {...}, "key_id": "...",
     "prev_hash": "<hash of record 2>", "hash": "<sha256 of the record without hash/signature>",
     "signature": "<base64 Ed25519 signature of the hash>"}

``hash`` covers the canonical JSON (sorted keys, no spaces, ASCII) of every field except ``hash`` and
``signature``, so editing any value, deleting, inserting or reordering records breaks the chain or a
signature. A record is one ``write`` of one line followed by ``fsync``: a crash leaves at most a torn
last line, which :func:`verify_trail` reports as truncation (and :class:`AuditTrail` moves aside, with
a ``trail_recovered`` record, before appending again).

The server's signing key is generated once (PEM, mode 0600) and reused; its public key is written next
to the trail (``<trail>.pub.pem``). Verify with a copy of the public key kept elsewhere (the consortium's
record of it): the copy next to the trail only proves the trail is self-consistent.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_write_bytes, atomic_write_json

GENESIS = "0" * 64
RECORD_KEYS = ("seq", "time", "event", "fields", "key_id", "prev_hash", "hash", "signature")
HEAD_SUFFIX = ".head.json"
PUBLIC_SUFFIX = ".pub.pem"

# verdict reasons
OK = "ok"
EMPTY = "empty"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
CORRUPTED = "corrupted"
EDITED = "edited"
DELETED = "deleted"
INSERTED = "inserted"
REORDERED = "reordered"
BAD_SIGNATURE = "bad_signature"
WRONG_KEY = "wrong_key"
CHAIN_BROKEN = "chain_broken"


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: numpy/torch scalars become numbers, paths strings, and non-finite floats the
    strings ``"inf"``, ``"-inf"``, ``"nan"`` (canonical JSON has no NaN), tuples lists.

    Args:
        obj: a value made of mappings, sequences and scalars.

    Returns:
        The same content in JSON types.

    Raises:
        InputError: a value that has no JSON form (e.g. bytes or an array with more than one element).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy / torch scalars (and one-element arrays)
    count = obj.numel() if callable(getattr(obj, "numel", None)) else getattr(obj, "size", 1)
    if callable(item) and count == 1 and not isinstance(obj, (bytes, bytearray)):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    raise InputError(f"value of type {type(obj).__name__} cannot be recorded (only scalars, strings, lists and mappings)")


def canonical_json(obj: Any) -> bytes:
    """Canonical bytes of ``obj``: sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of a record's canonical JSON without its ``hash`` and ``signature``."""
    body = {k: v for k, v in record.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) bytes of a public key."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_or_create_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The server's Ed25519 signing key at ``path``, generated (PEM, mode 0600) the first time.

    Args:
        path: PEM file of the private key, e.g. in the server's workspace.

    Returns:
        The private key.

    Raises:
        InputError: the file exists but is not an unencrypted Ed25519 private key in PEM.
    """
    path = Path(path)
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: not an unencrypted PEM private key ({e})") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, pem)
    os.chmod(path, 0o600)
    return key


def load_public_key(key: str | os.PathLike | bytes | Ed25519PublicKey | Ed25519PrivateKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or PEM bytes (public, or the private key itself), or a key object.

    Raises:
        InputError: the file is missing or holds no Ed25519 public key.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    data = key
    if not isinstance(key, bytes):
        try:
            data = Path(key).read_bytes()
        except OSError as e:
            raise InputError(f"{key}: cannot read the public key ({e.strerror or e})") from e
    try:
        if b"PRIVATE KEY" in data:  # the server's own key file: use its public half
            public = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{key if not isinstance(key, bytes) else 'public key'}: not a PEM public key ({e})") from e
    if not isinstance(public, Ed25519PublicKey):
        raise InputError(f"{key if not isinstance(key, bytes) else 'public key'}: expected an Ed25519 key, found {type(public).__name__}")
    return public


def public_key_path(trail: str | os.PathLike) -> Path:
    """Where the trail's public key is written: next to it, ``<trail>.pub.pem``."""
    return Path(str(trail) + PUBLIC_SUFFIX)


def head_path(trail: str | os.PathLike) -> Path:
    """The trail's signed head (last seq and hash), rewritten atomically after each record."""
    return Path(str(trail) + HEAD_SUFFIX)


class AuditTrail:
    """Append-only signed trail in one JSON-lines file; one instance per server process.

    Args:
        path: the trail file (created if missing; an existing trail is continued).
        key_path: the server's private key (PEM); generated there on first use.

    Raises:
        InputError: the existing trail is not a valid trail signed by this key (it is never overwritten).
    """

    def __init__(self, path: str | os.PathLike, key_path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = load_or_create_key(key_path)
        self.public_key = self._key.public_key()
        self.key_id = key_id(self.public_key)
        pub = public_key_path(self.path)
        if not pub.exists() or pub.read_bytes() != public_pem(self.public_key):
            atomic_write_bytes(pub, public_pem(self.public_key))
        self._lock = threading.Lock()
        self._seq, self._prev = 0, GENESIS
        if self.path.exists() and self.path.stat().st_size:
            self._resume()

    def _resume(self) -> None:
        """Continue an existing trail: verify it, move a torn last line aside and note it in the trail."""
        verdict = verify_trail(self.path, self.public_key)
        data = self.path.read_bytes()
        if not verdict.ok and (verdict.reason != TRUNCATED or data.endswith(b"\n")):
            raise InputError(f"{self.path}: cannot append to this trail: {verdict.message}")
        self._seq, self._prev = verdict.records, verdict.last_hash or GENESIS
        if verdict.reason == TRUNCATED:
            keep = data[: data.rfind(b"\n") + 1]
            torn = data[len(keep):]
            atomic_write_bytes(self.path.with_name(self.path.name + f".torn-{int(time.time())}"), torn)
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
                f.flush()
                os.fsync(f.fileno())
            self.append("trail_recovered", {"dropped_bytes": len(torn), "detail": verdict.detail})

    @property
    def seq(self) -> int:
        """Number of records in the trail (the next record's seq)."""
        return self._seq

    def append(self, event: str, fields: Mapping[str, Any] | None = None, when: float | None = None) -> dict[str, Any]:
        """Sign and append one record, durably (one ``write`` of one line, then ``fsync``).

        Args:
            event: event name, e.g. ``round_start``.
            fields: the event's details (scalars, strings, lists and mappings only).
            when: event time in seconds since the epoch (default: now).

        Returns:
            The record as written.

        Raises:
            InputError: a field value has no JSON form.
        """
        with self._lock:
            record = {"seq": self._seq, "time": float(time.time() if when is None else when), "event": str(event),
                      "fields": jsonable(dict(fields or {})), "key_id": self.key_id, "prev_hash": self._prev}
            record["hash"] = record_hash(record)
            record["signature"] = base64.b64encode(self._key.sign(record["hash"].encode("ascii"))).decode("ascii")
            line = canonical_json(record) + b"\n"
            new = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                with contextlib.suppress(ImportError, OSError):
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX)
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"{self.path}: short write of record {self._seq} ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:  # make the new file's directory entry durable too
                with contextlib.suppress(OSError):
                    dfd = os.open(self.path.parent, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
            self._seq, self._prev = self._seq + 1, record["hash"]
            atomic_write_json(head_path(self.path), {"seq": record["seq"], "hash": record["hash"], "signature": record["signature"],
                                                     "key_id": self.key_id})
            return record


@dataclasses.dataclass
class Verdict:
    """Result of :func:`verify_trail`.

    Attributes:
        ok: every record verified and nothing is missing at the end (as far as the head file tells).
        reason: ``ok``, ``empty``, ``unreadable``, ``truncated``, ``corrupted``, ``edited``, ``deleted``, ``inserted``,
            ``reordered``, ``bad_signature``, ``wrong_key`` or ``chain_broken``.
        detail: one sentence a person can act on, naming the record.
        path: the trail verified.
        records: records verified before the first bad one (all of them when ``ok``).
        first_bad_seq: the seq the first bad record should have had (its position), or None.
        first_bad_line: 1-based line number of the first bad record, or None.
        complete: the trail ends with a ``job_end`` record.
        last_event: event of the last good record.
        last_hash: hash of the last good record.
        key_id: fingerprint of the key verified against.
        events: count of each event among the good records.
    """

    ok: bool
    reason: str
    detail: str
    path: str
    records: int = 0
    first_bad_seq: int | None = None
    first_bad_line: int | None = None
    complete: bool = False
    last_event: str | None = None
    last_hash: str | None = None
    key_id: str | None = None
    events: dict[str, int] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def message(self) -> str:
        """``OK``/``FAILED`` line with the reason and detail."""
        return f"{'OK' if self.ok else 'FAILED'} ({self.reason}): {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a JSON-ready dict (with ``message``)."""
        return {**dataclasses.asdict(self), "message": self.message}


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The trail's records (verify first: this only parses; a torn or malformed line is skipped)."""
    out = []
    for raw in Path(path).read_bytes().split(b"\n"):
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if _well_formed(rec):
            out.append(rec)
    return out


def _well_formed(rec: Any) -> bool:
    """A dict with every record key, of the right types, whose canonical JSON exists (no NaN)."""
    if not isinstance(rec, dict) or any(k not in rec for k in RECORD_KEYS):
        return False
    types = {"seq": int, "time": (int, float), "event": str, "fields": dict, "key_id": str, "prev_hash": str, "hash": str, "signature": str}
    if any(not isinstance(rec[k], t) or isinstance(rec[k], bool) for k, t in types.items()):
        return False
    try:
        canonical_json(rec)
    except ValueError:
        return False
    return True


def verify_trail(path: str | os.PathLike, public_key: Any = None) -> Verdict:
    """Check a trail record by record and name the first bad one; never raises for a bad trail.

    Args:
        path: the trail file.
        public_key: the server's public key (PEM path, PEM bytes or key object). None uses the copy next
            to the trail, which proves only self-consistency; pass the copy the consortium keeps.

    Returns:
        A :class:`Verdict`; ``verdict.ok`` is False for a tampered, truncated, corrupted or unreadable trail.
    """
    path = Path(path)

    def bad(reason: str, detail: str, **kw: Any) -> Verdict:
        return Verdict(False, reason, f"{path}: {detail}", str(path), **kw)

    try:
        key = load_public_key(public_key if public_key is not None else public_key_path(path))
    except InputError as e:
        return bad(UNREADABLE, f"no usable public key: {e}")
    kid = key_id(key)
    try:
        data = path.read_bytes()
    except OSError as e:
        return bad(UNREADABLE, f"cannot read the trail ({e.strerror or e})", key_id=kid)
    if not data:
        return bad(EMPTY, "the trail is empty (no record was ever written)", key_id=kid)
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # the last record's newline never made it to disk
    if not torn:
        lines = lines[:-1]
    parsed: list[dict | None] = []
    for raw in lines:
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        parsed.append(rec if _well_formed(rec) else None)
    seqs_later = [rec["seq"] if rec is not None else None for rec in parsed]
    prev, events, last_event, last_hash = GENESIS, {}, None, None

    def state(i: int) -> dict[str, Any]:
        return {"records": i, "first_bad_seq": i, "first_bad_line": i + 1, "last_event": last_event, "last_hash": last_hash,
                "key_id": kid, "events": dict(events)}

    for i, rec in enumerate(parsed):
        last_line = i == len(parsed) - 1
        where = f"record {i} (line {i + 1})"
        if rec is None:
            if last_line and torn:
                return bad(TRUNCATED, f"{where} is torn: the trail ends in a partial line ({len(lines[-1])} bytes), "
                                      f"e.g. a crash while appending; {i} records before it verify", **state(i))
            return bad(CORRUPTED, f"{where} is not a complete JSON record", **state(i))
        if record_hash(rec) != rec["hash"]:
            return bad(EDITED, f"{where} (event {rec.get('event')!r}) was edited: its content no longer matches its hash", **state(i))
        try:
            key.verify(base64.b64decode(rec["signature"], validate=True), rec["hash"].encode("ascii"))
            signed = True
        except (InvalidSignature, ValueError, TypeError):
            signed = False
        if not signed:
            if i in seqs_later[i + 1:]:
                return bad(INSERTED, f"{where} was inserted: it is not signed by the server and the real seq {i} follows later", **state(i))
            if rec["key_id"] != kid:
                if i == 0 or all(r is not None and r["key_id"] == rec["key_id"] for r in parsed):
                    return bad(WRONG_KEY, f"the trail is signed by key {rec['key_id']}, not by the key given ({kid})", **state(i))
                return bad(BAD_SIGNATURE, f"{where} is signed by another key ({rec['key_id']}, expected {kid}): forged", **state(i))
            return bad(BAD_SIGNATURE, f"{where} has an invalid signature: forged or re-hashed after an edit", **state(i))
        if rec["seq"] != i:
            if rec["seq"] < i:
                return bad(INSERTED, f"{where} carries seq {rec['seq']}, already seen: a copied record was inserted", **state(i))
            if i in seqs_later[i + 1:]:
                return bad(REORDERED, f"{where} carries seq {rec['seq']} but seq {i} comes later: records were reordered", **state(i))
            missing = f"seq {i}" if rec["seq"] == i + 1 else f"seqs {i}..{rec['seq'] - 1}"
            return bad(DELETED, f"{missing} missing before line {i + 1}: deleted", **state(i))
        if rec["prev_hash"] != prev:
            return bad(CHAIN_BROKEN, f"{where} does not follow the previous record (prev_hash mismatch): spliced from another trail", **state(i))
        prev = last_hash = rec["hash"]
        last_event = rec["event"]
        events[last_event] = events.get(last_event, 0) + 1
    n = len(parsed)
    done = {"records": n, "last_event": last_event, "last_hash": last_hash, "key_id": kid, "events": dict(events),
            "complete": last_event == "job_end"}
    head = head_path(path)
    if head.exists():
        try:
            h = json.loads(head.read_text())
            key.verify(base64.b64decode(h["signature"]), str(h["hash"]).encode("ascii"))
            head_seq = int(h["seq"])
        except (OSError, ValueError, KeyError, TypeError, InvalidSignature):
            head_seq = None
        if head_seq is not None and head_seq >= n:
            return bad(TRUNCATED, f"the trail ends at seq {n - 1} but its signed head says seq {head_seq} was written: "
                                  f"record {n}" + (f" to {head_seq}" if head_seq > n else "") + " removed from the end", first_bad_seq=n, first_bad_line=n + 1,
                       **{k: v for k, v in done.items() if k != "complete"})
    status = "complete (ends with job_end)" if done["complete"] else f"open: last event {last_event!r} (job still running or ended abnormally)"
    return Verdict(True, OK, f"{path}: {n} records verified with key {kid}; {status}", str(path), **done)
