"""Fault plans for drills and stress tests: stragglers, dropouts, unreachable rounds, poisoned updates.

A plan is plain data (a JSON file or CLI options). Each site receives its own part and applies it with
real mechanisms inside the FLARE client script: it really sleeps (FLARE's round timeout and
``wait_time_after_min_received`` decide whether the server waits), really fails its training task
(the server's ``min_clients`` decides whether the round goes on), really answers too late for the
server's timeout (FLARE discards the late result), or really sends a corrupted update (the server's
validation must reject it). Decisions are drawn from a generator seeded by (plan seed, site, round), so
a plan replays identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_fl_ext.errors import InputError

POISONS = ("nan", "scale", "shape", "keys")


@dataclass
class SiteFaults:
    """What goes wrong at one site.

    Args:
        delay: ``[low, high]`` seconds slept before training each round (uniform); ``[0, 0]`` for none.
        dropout: probability per round that the site fails mid-round (trains, then its task raises).
        fail_rounds: rounds in which the site always fails.
        unreachable: ``[[k, m], ...]``: rounds k..m (inclusive) in which the site does not answer within the
            round's timeout (it answers after ``silence`` seconds; FLARE drops the late result).
        silence: seconds an unreachable site stays silent (more than the job's ``train_timeout``).
        poison: ``{round: kind}`` with kind ``nan`` (non-finite values), ``scale`` (update times 1e4),
            ``shape`` (a tensor with a wrong shape) or ``keys`` (an unexpected key).
    """

    delay: list[float] = field(default_factory=lambda: [0.0, 0.0])
    dropout: float = 0.0
    fail_rounds: list[int] = field(default_factory=list)
    unreachable: list[list[int]] = field(default_factory=list)
    silence: float = 0.0
    poison: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.poison = {int(k): v for k, v in self.poison.items()}
        self.delay = [float(x) for x in self.delay]

    def validate(self, where: str) -> None:
        if len(self.delay) != 2 or not 0 <= self.delay[0] <= self.delay[1]:
            raise InputError(f"fault plan, {where}: delay must be [low, high] with 0 <= low <= high, got {self.delay}")
        if not 0 <= self.dropout <= 1:
            raise InputError(f"fault plan, {where}: dropout must be a probability in [0, 1], got {self.dropout}")
        if any(len(r) != 2 or r[0] > r[1] for r in self.unreachable):
            raise InputError(f"fault plan, {where}: unreachable entries must be [first_round, last_round], got {self.unreachable}")
        if self.unreachable and not self.silence > 0:
            raise InputError(f"fault plan, {where}: unreachable rounds need silence > 0 (seconds, beyond the round timeout)")
        bad = {r: k for r, k in self.poison.items() if k not in POISONS}
        if bad:
            raise InputError(f"fault plan, {where}: poison kinds must be in {POISONS}, got {bad}")


@dataclass
class RoundFault:
    """What one site does in one round."""

    delay: float = 0.0
    fail: bool = False
    silent: float = 0.0
    poison: str | None = None


@dataclass
class FaultPlan:
    """Faults per site (``"*"`` applies to every site not named) and the seed of their random draws.

    Args:
        sites: ``{site or "*": SiteFaults}``.
        seed: seed of the per-site, per-round draws.
        server_crash_after_round: the server stops with an error right after checkpointing this round; run the
            job again with ``resume`` to continue (a server-restart drill).
    """

    sites: dict[str, SiteFaults] = field(default_factory=dict)
    seed: int = 0
    server_crash_after_round: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FaultPlan":
        unknown = set(data) - {"sites", "seed", "server_crash_after_round"}
        if unknown:
            raise InputError(f"fault plan: unknown keys {sorted(unknown)} (expected 'sites', 'seed', 'server_crash_after_round')")
        try:
            sites = {name: SiteFaults(**spec) for name, spec in (data.get("sites") or {}).items()}
        except TypeError as e:
            raise InputError(f"fault plan: {e}") from e
        crash = data.get("server_crash_after_round")
        plan = cls(sites=sites, seed=int(data.get("seed", 0)), server_crash_after_round=None if crash is None else int(crash))
        for name, faults in plan.sites.items():
            faults.validate(name)
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaultPlan":
        """Read a plan from a JSON file.

        Raises:
            InputError: unreadable file or invalid plan (the message names the file).
        """
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"fault plan {path}: {e}") from e
        except InputError as e:
            raise InputError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "sites": {k: asdict(v) for k, v in self.sites.items()},
                "server_crash_after_round": self.server_crash_after_round}

    def for_site(self, site: str) -> SiteFaults | None:
        return self.sites.get(site, self.sites.get("*"))

    def site_json(self, site: str) -> str:
        """This site's faults and the seed, compact (FLARE passes script arguments split on whitespace)."""
        faults = self.for_site(site)
        return json.dumps({"seed": self.seed, "site": site, **asdict(faults)}, separators=(",", ":")) if faults else ""


def decide(site_json: str, round_num: int) -> RoundFault:
    """What the site described by :meth:`FaultPlan.site_json` does in ``round_num`` (deterministic)."""
    data = json.loads(site_json)
    seed, site = data.pop("seed"), data.pop("site")
    faults = SiteFaults(**data)
    digest = int.from_bytes(hashlib.sha256(site.encode()).digest()[:4], "big")
    rng = np.random.default_rng([seed, digest, round_num])
    delay = float(rng.uniform(*faults.delay)) if faults.delay[1] > 0 else 0.0
    fail = round_num in faults.fail_rounds or bool(rng.random() < faults.dropout)
    silent = faults.silence if any(a <= round_num <= b for a, b in faults.unreachable) else 0.0
    return RoundFault(delay=delay, fail=fail, silent=silent, poison=faults.poison.get(round_num))


def poison_update(params: dict[str, Any], kind: str) -> dict[str, Any]:
    """A corrupted copy of ``params`` (torch tensors or arrays) of the given kind, for drills."""
    import torch

    out = {k: torch.as_tensor(v).clone() for k, v in params.items()}
    first = next(k for k in sorted(out) if out[k].is_floating_point())
    if kind == "nan":
        out[first].view(-1)[0] = float("nan")
    elif kind == "scale":
        out = {k: v * 1e4 if v.is_floating_point() else v for k, v in out.items()}
    elif kind == "shape":
        out[first] = out[first].reshape(-1)[:-1]
    elif kind == "keys":
        out["injected.weight"] = torch.zeros(3)
    return out
