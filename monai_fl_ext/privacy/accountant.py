"""Privacy accounting for per-site DP-SGD, kept for the whole federated job.

Why one persistent accountant per site
--------------------------------------
Each site trains with DP-SGD (Opacus): per-sample gradients are clipped to
``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added, on Poisson-sampled batches with sample
rate ``q = batch_size / N``. The privacy loss of the site's data accumulates over *every*
noisy step the site ever takes on it, across all federated rounds.

A common bug is to build a new ``opacus.PrivacyEngine`` in each round (the client
process, or the learner object, is recreated per round). Its accountant then starts from
an empty history, so the epsilon it reports is the epsilon of *that round only*: after
20 rounds the log still shows the one-round value, under-reporting the real spending by
a large factor. :class:`PersistentAccountant` fixes this: a site keeps one accountant for
the whole job, whose history ``[(noise_multiplier, sample_rate, num_steps), ...]`` is
written atomically to a JSON file after every change and reloaded on construction, so it
survives process restarts, crashes and resumed jobs. A state file that cannot be read is
an error, never a silent reset to zero, because a reset would under-report privacy
spending.

Why sample-level DP at each site
--------------------------------
For hospitals the unit to protect is a patient (one or a few images), not a whole
hospital. DP-SGD at each site gives sample-level (example-level) (epsilon, delta)-DP for
that site's patients with respect to everything the site sends out: the model updates,
and so the global model and anything derived from it (post-processing). When the sites
hold disjoint patients, each patient's data is seen by one site only, so the job's
guarantee for any patient is that of their site, and the job-level figure to report is
the **maximum** epsilon over sites (not the sum). Client-level DP (DP-FedAvg, noise added
to the aggregate of clipped site updates) protects a whole site's participation; with a
handful of sites that are all sampled every round it gives very large epsilon
(:func:`client_level_epsilon`: about 30 after 20 rounds at noise multiplier 1), so it is
reported for comparison only.

Accountants
-----------
``"rdp"`` (default) is Opacus' Renyi-DP accountant (Mironov 2017; conversion of Balle
et al. 2020), which agrees with Google's ``dp_accounting`` RDP accountant when both use
the same orders (:func:`opacus_rdp_epsilon`, :func:`dp_accounting_rdp_epsilon`).
``"prv"`` is Opacus' PRV accountant (Gopi et al. 2021): tighter (smaller epsilon for the
same training) but slower and numerical. Note that ``opacus.PrivacyEngine()`` defaults to
PRV, so its printed epsilon differs from the RDP value for the same run.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_write_json, read_json

__all__ = [
    "ACCOUNTANTS",
    "CLIENT_LEVEL_ORDERS",
    "STATE_FORMAT",
    "BudgetExceeded",
    "DPSettings",
    "PersistentAccountant",
    "client_level_epsilon",
    "dp_accounting_rdp_epsilon",
    "noise_for_target",
    "opacus_rdp_epsilon",
]

ACCOUNTANTS = ("rdp", "prv")
"""Accountant names accepted everywhere: Opacus' ``"rdp"`` and ``"prv"``."""

STATE_FORMAT = "monai_fl_ext.privacy.accountant/1"
"""Value of the ``format`` key in a :class:`PersistentAccountant` state file."""

DEFAULT_TARGET_EPSILON = 8.0
DEFAULT_DELTA = 1e-5


class BudgetExceeded(InputError):
    """Training further would take a site's epsilon over its budget; nothing was recorded.

    Attributes:
        where: the site (or other context) named in the message.
        current: epsilon spent so far.
        projected: epsilon after the refused steps.
        budget: the site's budget epsilon.
    """

    def __init__(self, message: str, *, where: str = "", current: float = 0.0, projected: float = 0.0,
                 budget: float = 0.0):
        super().__init__(message)
        self.where = where
        self.current = current
        self.projected = projected
        self.budget = budget


# ---------------------------------------------------------------------------------------
# checks


def _for(where: str) -> str:
    return f" for {where}" if where else ""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_positive(name: str, value: Any, where: str = "") -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name}={value!r} must be a positive finite number{_for(where)}")
    return float(value)


def _check_noise(value: Any, where: str = "") -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise InputError(f"noise_multiplier={value!r} must be a finite number >= 0{_for(where)}")
    return float(value)


def _check_rate(value: Any, where: str = "") -> float:
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise InputError(f"sample_rate={value!r} must be in (0, 1]{_for(where)}")
    return float(value)


def _check_delta(value: Any, where: str = "") -> float:
    if not _is_number(value) or not math.isfinite(value) or not 0 < value < 1:
        raise InputError(f"delta={value!r} must be in (0, 1){_for(where)}")
    return float(value)


def _check_steps(name: str, value: Any, minimum: int, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}={value!r} must be an integer >= {minimum}{_for(where)}")
    return int(value)


def _check_accountant(value: Any, where: str = "") -> str:
    if value not in ACCOUNTANTS:
        raise InputError(f"accountant={value!r} must be one of {', '.join(ACCOUNTANTS)}{_for(where)}")
    return value


def _make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def _merge(history: list[tuple[float, float, int]], noise_multiplier: float, sample_rate: float,
           steps: int) -> list[tuple[float, float, int]]:
    """A new history with ``steps`` appended, merged into the last entry as Opacus does."""
    out = list(history)
    if steps == 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


# ---------------------------------------------------------------------------------------
# settings


@dataclass
class DPSettings:
    """A site's DP-SGD settings.

    Either ``noise_multiplier`` is given, or it is calibrated from ``target_epsilon`` over
    the planned training (:func:`noise_for_target`). With neither given, ``target_epsilon``
    defaults to 8.0.

    Attributes:
        noise_multiplier: Gaussian noise std divided by the clipping norm; None to
            calibrate from ``target_epsilon``.
        target_epsilon: epsilon the noise is calibrated to reach at the end of the
            planned job; default 8.0 when ``noise_multiplier`` is None.
        delta: the delta of (epsilon, delta)-DP; must be below 1/N for a site with N
            samples.
        max_grad_norm: per-sample gradient clipping norm.
        budget_epsilon: the site's hard budget: training that would exceed it is refused
            (:meth:`PersistentAccountant.check_budget`); default ``target_epsilon``
            (None, no hard budget, when only ``noise_multiplier`` is given).
        accountant: ``"rdp"`` (default) or ``"prv"``.
        grad_sample_mode: how per-sample gradients are clipped: ``"mixed_ghost"`` (default; the same clipped
            sum as Opacus' hooks without per-sample gradients for 2D convolution weights, about 1.5x the
            non-private step instead of 7-9x: docs/privacy.md) or ``"hooks"`` (Opacus' per-sample gradients).
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    budget_epsilon: float | None = None
    accountant: str = "rdp"
    grad_sample_mode: str = "mixed_ghost"

    def __post_init__(self) -> None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            self.target_epsilon = DEFAULT_TARGET_EPSILON
        if self.budget_epsilon is None:
            self.budget_epsilon = self.target_epsilon

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> DPSettings:
        """Build settings from a mapping (e.g. a config file's ``dp`` section).

        Args:
            d: keys among the dataclass fields.
            where: context (site, file) named in error messages.

        Returns:
            The settings (not yet validated against a data set size; call :meth:`validate`).

        Raises:
            InputError: ``d`` is not a mapping or has unknown keys.
        """
        if not isinstance(d, dict):
            raise InputError(f"DP settings{_for(where)} must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown DP setting(s) {unknown}{_for(where)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-serialisable)."""
        return asdict(self)

    def validate(self, num_samples: int, where: str = "") -> DPSettings:
        """Check the settings for a site holding ``num_samples`` training samples.

        Args:
            num_samples: N, the number of training samples at the site.
            where: the site's name, used in error messages (e.g. ``"site-2"``).

        Returns:
            ``self``, to allow chaining.

        Raises:
            InputError: naming the parameter and the site, when ``num_samples < 1``;
                ``delta <= 0`` or ``delta >= 1/N``; ``target_epsilon`` or ``budget_epsilon``
                not positive; ``budget_epsilon < target_epsilon``; ``max_grad_norm`` not
                positive; ``noise_multiplier`` negative; both ``noise_multiplier`` and
                ``target_epsilon`` None; an unknown accountant.
        """
        site = _for(where)
        if self.grad_sample_mode not in ("hooks", "mixed_ghost"):
            raise InputError(f"grad_sample_mode={self.grad_sample_mode!r} must be 'hooks' or 'mixed_ghost'{site}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InputError(f"num_samples={num_samples!r} must be an integer >= 1{site}")
        _check_accountant(self.accountant, where)
        if not _is_number(self.delta) or not math.isfinite(self.delta) or self.delta <= 0:
            raise InputError(f"delta={self.delta!r} must be a positive number{site}")
        if self.delta >= 1.0 / num_samples:
            raise InputError(
                f"delta={self.delta:g} must be < 1/N = {1.0 / num_samples:.3g}{site} with N={num_samples} "
                f"samples (a delta that large allows leaking whole records; use e.g. delta <= 1/(10 N))"
            )
        _check_positive("max_grad_norm", self.max_grad_norm, where)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise InputError(f"DP settings{site} need noise_multiplier or target_epsilon; both are None")
        if self.noise_multiplier is not None:
            _check_noise(self.noise_multiplier, where)
        if self.target_epsilon is not None:
            _check_positive("target_epsilon", self.target_epsilon, where)
        if self.budget_epsilon is not None:
            _check_positive("budget_epsilon", self.budget_epsilon, where)
            if self.target_epsilon is not None and self.budget_epsilon < self.target_epsilon:
                raise InputError(
                    f"budget_epsilon={self.budget_epsilon:g} is below target_epsilon={self.target_epsilon:g}{site}: "
                    f"the planned training would be refused; raise the budget or lower the target"
                )
        return self


# ---------------------------------------------------------------------------------------
# one-shot computations


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) reaching ``target_epsilon``.

    Uses ``opacus.accountants.utils.get_noise_multiplier`` (binary search, epsilon
    tolerance 0.01): the returned sigma gives epsilon <= target and within 0.01 of it.

    Args:
        target_epsilon: epsilon to reach after ``steps`` steps.
        delta: the delta of (epsilon, delta)-DP.
        sample_rate: Poisson sampling rate q = batch_size / N.
        steps: number of noisy steps planned (over the whole job).
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        The noise multiplier sigma.

    Raises:
        InputError: invalid arguments, or the target cannot be reached (noise above
            Opacus' maximum sigma would be needed).
    """
    from opacus.accountants.utils import get_noise_multiplier

    target_epsilon = _check_positive("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    sample_rate = _check_rate(sample_rate)
    steps = _check_steps("steps", steps, 1)
    _check_accountant(accountant)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" while bracketing sigma
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant,
                                              epsilon_tolerance=0.01))
    except (ValueError, OverflowError, ArithmeticError) as e:
        raise InputError(
            f"target_epsilon={target_epsilon:g} is unreachable at delta={delta:g}, sample_rate={sample_rate:g}, "
            f"steps={steps} with the {accountant} accountant ({e}); raise the target or train fewer steps"
        ) from e


def opacus_rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of DP-SGD by Opacus' RDP accountant (default orders).

    Args:
        noise_multiplier: sigma.
        sample_rate: Poisson sampling rate q.
        steps: number of steps (0 gives 0.0).
        delta: the delta of (epsilon, delta)-DP.

    Returns:
        Epsilon (inf when ``noise_multiplier`` is 0).

    Raises:
        InputError: invalid arguments.
    """
    from opacus.accountants import RDPAccountant

    noise_multiplier = _check_noise(noise_multiplier)
    sample_rate = _check_rate(sample_rate)
    steps = _check_steps("steps", steps, 0)
    delta = _check_delta(delta)
    if steps == 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def dp_accounting_rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of DP-SGD by Google's ``dp_accounting`` RDP accountant.

    ``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))`` self-composed
    ``steps`` times, with the same RDP orders as Opacus' ``RDPAccountant.DEFAULT_ALPHAS``
    for a like-for-like check of :func:`opacus_rdp_epsilon` (agreement to about 1e-3).

    Args:
        noise_multiplier: sigma.
        sample_rate: Poisson sampling rate q.
        steps: number of steps (0 gives 0.0).
        delta: the delta of (epsilon, delta)-DP.

    Returns:
        Epsilon.

    Raises:
        InputError: invalid arguments.
        ImportError: ``dp-accounting`` is not installed.
    """
    noise_multiplier = _check_noise(noise_multiplier)
    sample_rate = _check_rate(sample_rate)
    steps = _check_steps("steps", steps, 0)
    delta = _check_delta(delta)
    if steps == 0:
        return 0.0
    import dp_accounting  # imported lazily: it takes about 2 s
    from dp_accounting import rdp
    from opacus.accountants import RDPAccountant

    acc = rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


CLIENT_LEVEL_ORDERS: list[float] = (
    [1.01, 1.02, 1.03, 1.05, 1.07]
    + [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [64, 80, 96, 128, 192, 256, 384, 512, 1024]
)
"""RDP orders for :func:`client_level_epsilon`: Opacus' defaults widened at both ends."""


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """Client-level (user-level) epsilon of DP-FedAvg, by RDP.

    Each round the server aggregates clipped site updates and adds Gaussian noise of std
    ``noise_multiplier`` times the clip; sites are sampled with probability
    ``sampling_rate`` (1.0: every site every round, the usual case with a few hospitals,
    which makes each round a plain Gaussian mechanism with RDP ``alpha / (2 z^2)``). The
    rounds compose; the RDP is converted to (epsilon, delta) as Opacus does, over
    :data:`CLIENT_LEVEL_ORDERS`.

    Args:
        noise_multiplier: z, noise std over the per-site clipping norm.
        rounds: number of federated rounds (0 gives 0.0).
        delta: the delta of (epsilon, delta)-DP.
        sampling_rate: probability a site takes part in a round.

    Returns:
        Epsilon protecting one site's entire participation (inf when z is 0).

    Raises:
        InputError: invalid arguments.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    noise_multiplier = _check_noise(noise_multiplier)
    rounds = _check_steps("rounds", rounds, 0)
    delta = _check_delta(delta)
    sampling_rate = _check_rate(sampling_rate)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    rdp = rdp_analysis.compute_rdp(q=sampling_rate, noise_multiplier=noise_multiplier, steps=rounds,
                                   orders=CLIENT_LEVEL_ORDERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for tiny rdp
        eps, _ = rdp_analysis.get_privacy_spent(orders=CLIENT_LEVEL_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


# ---------------------------------------------------------------------------------------
# persistent accountant


class PersistentAccountant:
    """A site's privacy accountant for the whole job, persisted to a JSON file.

    Wraps an Opacus accountant (``RDPAccountant`` or ``PRVAccountant``). Its history
    ``[(noise_multiplier, sample_rate, num_steps), ...]`` is written atomically to
    ``path`` after every change and reloaded on construction. The file records the raw
    history, so it can be re-analysed with either accountant.

    State file (canonical JSON)::

        {"format": "monai_fl_ext.privacy.accountant/1", "accountant": "rdp",
         "history": [[1.5, 0.04, 2250]], "steps": 2250}

    Args:
        path: the state file; created on the first :meth:`record`.
        accountant: ``"rdp"`` (default) or ``"prv"``.
        delta: default delta for :meth:`state`.

    Raises:
        InputError: unknown accountant, or ``path`` exists but cannot be read or is not a
            valid state file (the message names the file; it is never reset silently).
    """

    def __init__(self, path: str | os.PathLike, accountant: str = "rdp", delta: float = DEFAULT_DELTA):
        self.path = Path(path)
        self.accountant_name = _check_accountant(accountant)
        self.delta = _check_delta(delta)
        self._acc = _make_accountant(self.accountant_name)
        self._acc.history = self._load()

    # -- persistence ------------------------------------------------------------------

    def _load(self) -> list[tuple[float, float, int]]:
        p = self.path
        if not p.exists():
            return []
        if not p.is_file():
            raise InputError(f"{p}: privacy accountant state is not a file")
        try:
            data = read_json(p)  # InputError naming the file for bad JSON
        except OSError as e:
            raise InputError(f"{p}: cannot read privacy accountant state ({e})") from e
        bad = f"{p}: not a valid privacy accountant state file"
        if not isinstance(data, dict) or "history" not in data:
            raise InputError(f"{bad} (expected an object with a 'history' list); refusing to reset the "
                             f"privacy spending to zero: restore or remove the file deliberately")
        if data.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise InputError(f"{bad}: format {data.get('format')!r}, expected {STATE_FORMAT!r}")
        hist = data["history"]
        if not isinstance(hist, list):
            raise InputError(f"{bad}: 'history' must be a list")
        out: list[tuple[float, float, int]] = []
        for i, entry in enumerate(hist):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise InputError(f"{bad}: history[{i}]={entry!r} must be [noise_multiplier, sample_rate, steps]")
            try:
                sigma = _check_noise(entry[0])
                q = _check_rate(entry[1])
                n = _check_steps("steps", entry[2], 1)
            except InputError as e:
                raise InputError(f"{bad}: history[{i}]: {e}") from e
            out.append((sigma, q, n))
        if "steps" in data and data["steps"] != sum(e[2] for e in out):
            raise InputError(f"{bad}: 'steps'={data['steps']!r} disagrees with the history's "
                             f"{sum(e[2] for e in out)} steps")
        return out

    def _save(self, history: list[tuple[float, float, int]]) -> None:
        atomic_write_json(self.path, {
            "format": STATE_FORMAT,
            "accountant": self.accountant_name,
            "history": [list(e) for e in history],
            "steps": sum(e[2] for e in history),
        })

    # -- queries ----------------------------------------------------------------------

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """A copy of the history ``[(noise_multiplier, sample_rate, num_steps), ...]``."""
        return [tuple(e) for e in self._acc.history]

    @property
    def steps(self) -> int:
        """Total noisy steps recorded so far."""
        return int(sum(e[2] for e in self._acc.history))

    def __len__(self) -> int:
        return len(self._acc.history)

    @staticmethod
    def _epsilon_of(acc, delta: float) -> float:
        if not acc.history:
            return 0.0
        if any(e[0] == 0 for e in acc.history):
            return math.inf
        return float(acc.get_epsilon(delta=delta))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``.

        Args:
            delta: the delta of (epsilon, delta)-DP.

        Returns:
            Epsilon (0.0 for an empty history; inf if any step had no noise).

        Raises:
            InputError: ``delta`` not in (0, 1).
        """
        return self._epsilon_of(self._acc, _check_delta(delta))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, extra_steps: int, delta: float) -> float:
        """Epsilon after ``extra_steps`` more steps, without recording them.

        Args:
            noise_multiplier: sigma of the extra steps.
            sample_rate: q of the extra steps.
            extra_steps: number of extra steps (0 gives the current epsilon).
            delta: the delta of (epsilon, delta)-DP.

        Returns:
            The projected epsilon.

        Raises:
            InputError: invalid arguments.
        """
        noise_multiplier = _check_noise(noise_multiplier)
        sample_rate = _check_rate(sample_rate)
        extra_steps = _check_steps("extra_steps", extra_steps, 0)
        delta = _check_delta(delta)
        tmp = _make_accountant(self.accountant_name)
        tmp.history = _merge(copy.deepcopy(self.history), noise_multiplier, sample_rate, extra_steps)
        return self._epsilon_of(tmp, delta)

    def check_budget(self, budget_epsilon: float | None, delta: float, noise_multiplier: float,
                     sample_rate: float, steps: int, where: str = "") -> float:
        """Refuse training that would take epsilon over the budget; records nothing.

        Args:
            budget_epsilon: the site's hard budget; None for no budget (the projection
                is still returned).
            delta: the delta of (epsilon, delta)-DP.
            noise_multiplier: sigma of the planned steps.
            sample_rate: q of the planned steps.
            steps: number of planned steps.
            where: the site's name for the message.

        Returns:
            The projected epsilon after the planned steps (within budget).

        Raises:
            BudgetExceeded: the projected epsilon is above ``budget_epsilon``; the message
                names the site, the current and projected epsilon and the budget.
            InputError: invalid arguments.
        """
        projected = self.epsilon_after(noise_multiplier, sample_rate, steps, delta)
        if budget_epsilon is None:
            return projected
        budget = _check_positive("budget_epsilon", budget_epsilon, where)
        if not projected <= budget:
            current = self.epsilon(delta)
            raise BudgetExceeded(
                f"{where or 'site'}: privacy budget exceeded: {steps} more steps (noise_multiplier="
                f"{noise_multiplier:g}, sample_rate={sample_rate:g}) would take epsilon from {current:.4f} "
                f"to {projected:.4f}, above the budget epsilon={budget:g} (delta={delta:g}, "
                f"{self.accountant_name} accountant, {self.steps} steps so far); nothing was recorded",
                where=where, current=current, projected=projected, budget=budget,
            )
        return projected

    # -- updates ----------------------------------------------------------------------

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` noisy steps and save the history atomically.

        Merges with the last history entry when noise multiplier and sample rate are
        equal (as Opacus does per step), so recording in two rounds and all at once give
        the same history. The file is written before the in-memory history changes.

        Args:
            noise_multiplier: sigma used.
            sample_rate: Poisson sampling rate q used.
            steps: number of steps taken (0 records nothing).

        Raises:
            InputError: invalid arguments.
            OSError: the state file cannot be written (the in-memory history is unchanged).
        """
        noise_multiplier = _check_noise(noise_multiplier)
        sample_rate = _check_rate(sample_rate)
        steps = _check_steps("steps", steps, 0)
        if steps == 0:
            return
        new = _merge(self.history, noise_multiplier, sample_rate, steps)
        self._save(new)
        self._acc.history = new

    def state(self, delta: float | None = None) -> dict[str, Any]:
        """A report of the spending so far.

        Args:
            delta: delta to report epsilon at; default the constructor's ``delta``.

        Returns:
            ``{"accountant", "epsilon", "delta", "steps", "history", "path"}`` (history as
            lists, JSON-serialisable).
        """
        delta = self.delta if delta is None else _check_delta(delta)
        return {
            "accountant": self.accountant_name,
            "epsilon": self.epsilon(delta),
            "delta": delta,
            "steps": self.steps,
            "history": [list(e) for e in self.history],
            "path": str(self.path),
        }

    def __repr__(self) -> str:
        return f"PersistentAccountant({str(self.path)!r}, accountant={self.accountant_name!r}, steps={self.steps})"
