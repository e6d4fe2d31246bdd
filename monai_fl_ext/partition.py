"""Split a datalist across N simulated hospital sites, reproducibly and never splitting a patient.

The unit of assignment is the patient: every image of a patient goes to the same site, whichever
split (training, validation or test) it is in, and each site keeps the original split membership and
order of its items. Items without a ``"patient"`` are each their own patient, keyed by image path.
All randomness comes from one ``numpy.random.default_rng(seed)``, applied to sorted patient ids, so
the same datalist, parameters and seed always give the same partition.

Strategies:

- ``iid``: patients are shuffled and dealt round-robin, so sites differ only by chance.
- ``dirichlet`` (label skew): see the multi-label rule below.
- ``quantity`` (size skew): site shares are drawn from Dirichlet(alpha * 1_N); the shuffled patients
  are cut at the cumulative shares.
- ``natural``: one site per distinct value of an item field (default ``"site"``, the acquiring hospital).
- ``dirichlet_field`` (feature skew): the Dirichlet rule below with the patient's value of an item field
  (``field``, e.g. a compound's scaffold family) as its class instead of its primary label, so each site holds
  some values of that field more than others. Every item of a patient must carry the same value.

Multi-label Dirichlet rule. The standard Dirichlet label-skew split (NVIDIA FLARE's and FedML's
CIFAR-10 examples) needs one class per sample, but a chest X-ray carries several findings or none.
Each patient is therefore given one *primary class*: the rarest finding that is positive on any of
its images, where a finding's rarity is its number of positive items in the whole datalist
(training, validation and test together) and ties go to the lower label index; a patient with no
positive finding gets the separate class "No Finding". Then, class by class (label order, then
"No Finding"), the class's patients are shuffled, proportions p ~ Dirichlet(alpha * 1_N) are drawn,
and the patients are cut into N consecutive runs at the cumulative proportions, run k going to site k.
Choosing the rarest finding lets the rare findings, which are the ones whose skew matters, follow
their own draw instead of being spread by a common co-occurring finding. Small alpha (e.g. 0.1) gives
each site a few dominant classes; large alpha (e.g. 100) approaches an iid split. If any site gets
fewer than ``min_site_size`` training items, the whole partition is drawn again from the same seeded
generator, up to 100 times, after which an error says that alpha and min_site_size cannot be met.
The ``quantity`` strategy uses the same resampling rule.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monai_fl_ext import __version__
from monai_fl_ext.data.datalist import NO_FINDING, SPLITS, read_datalist, validate_datalist
from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_output_dir, atomic_write_bytes, atomic_write_json, read_json, sha256_file

STRATEGIES: tuple[str, ...] = ("iid", "dirichlet", "quantity", "natural", "dirichlet_field")
MAX_DRAWS = 100
MANIFEST = "manifest.json"
HISTOGRAMS_JSON = "histograms.json"
HISTOGRAMS_PNG = "histograms.png"

# The optional parameters each strategy reads; the manifest records the others as null so it
# states exactly what determined the partition.
_PARAMETERS_USED: dict[str, frozenset[str]] = {
    "iid": frozenset({"seed"}),
    "dirichlet": frozenset({"alpha", "seed"}),
    "quantity": frozenset({"alpha", "seed"}),
    "natural": frozenset({"field"}),
    "dirichlet_field": frozenset({"alpha", "seed", "field"}),
}
# Natural site names become file names beside the manifest, and FLARE client names.
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED_SITE_NAMES = frozenset(Path(f).stem for f in (MANIFEST, HISTOGRAMS_JSON, HISTOGRAMS_PNG))


def partition_datalist(
    datalist: Mapping[str, Any],
    num_sites: int | None,
    strategy: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_site_size: int = 1,
    field: str = "site",
) -> dict[str, dict[str, Any]]:
    """Split a datalist into one datalist per site, keeping each patient at a single site.

    Args:
        datalist: a datalist (see :mod:`monai_fl_ext.data.datalist`); it is not modified.
        num_sites: number of sites N; for ``natural`` it may be None (one site per field value).
        strategy: ``"iid"``, ``"dirichlet"``, ``"quantity"``, ``"natural"`` or ``"dirichlet_field"``.
        alpha: Dirichlet concentration (> 0) for ``dirichlet`` and ``quantity``; smaller is more skewed.
        seed: seed of the random generator for ``iid``, ``dirichlet`` and ``quantity``.
        min_site_size: least number of training items per site (>= 0); a site always needs at least one.
        field: item field that names the site for ``natural``, or whose values are skewed for ``dirichlet_field``.

    Returns:
        ``{site_name: site_datalist}`` in site order (``site-1`` ... ``site-N``, or the sorted field
        values for ``natural``); each site datalist has the input's ``labels`` and its own items
        (copies, in input order) under ``training``, ``validation`` and ``test``.

    Raises:
        InputError: a malformed datalist or bad parameter (the message names it), more sites than
            patients, a natural field missing on an item, or a site left with too few training items.
    """
    validate_datalist(datalist)
    _check_parameters(strategy, num_sites, alpha, seed, min_site_size, field)
    min_training = max(min_site_size, 1)  # a site without training items cannot take part in a round
    if strategy == "natural":
        site_of = _natural_sites(datalist, field)
        site_names = sorted(set(site_of.values()))
        if num_sites is not None and num_sites != len(site_names):
            raise InputError(
                f"num_sites={num_sites} but field {field!r} has {len(site_names)} distinct values "
                f"({', '.join(site_names)}); pass num_sites={len(site_names)} or None"
            )
    else:
        patients = _patients(datalist)
        if num_sites > len(patients):
            raise InputError(f"num_sites={num_sites} but datalist has only {len(patients)} patients")
        site_names = [f"site-{k + 1}" for k in range(num_sites)]
        rng = np.random.default_rng(seed)
        if strategy == "iid":
            site_index = {p: k % num_sites for k, p in enumerate(_shuffled(patients, rng))}
        else:
            if strategy == "quantity":
                groups = [patients]
            elif strategy == "dirichlet_field":
                groups = _field_groups(datalist, patients, field)
            else:
                groups = _primary_class_groups(datalist, patients)
            site_index = _draw_dirichlet_runs(datalist, groups, num_sites, strategy, alpha, seed, min_training, rng)
        site_of = {p: site_names[k] for p, k in site_index.items()}
    sites = _split_by_site(datalist, site_of, site_names)
    for name, site in sites.items():
        if len(site["training"]) < min_training:
            raise InputError(
                f"site {name!r} gets {len(site['training'])} training items but needs min_site_size={min_training} "
                f"(never less than one); use fewer sites (num_sites={num_sites}) or a smaller min_site_size"
            )
    return sites


def primary_classes(datalist: Mapping[str, Any]) -> dict[str, str]:
    """Each patient's primary class for the ``dirichlet`` strategy.

    Args:
        datalist: a datalist.

    Returns:
        ``{patient_id: class}`` where class is the patient's rarest positive label over all its images
        (rarity = positive items for that label across all splits, ties to the lower label index), or
        ``"No Finding"`` when none of its images has a positive label.

    Raises:
        InputError: the datalist is malformed.
    """
    validate_datalist(datalist)
    labels = datalist["labels"]
    items = _all_items(datalist)
    prevalence = _label_totals(items, len(labels))
    positives: defaultdict[str, set[int]] = defaultdict(set)
    for item in items:
        positives[_patient_id(item)].update(k for k, v in enumerate(item["label"]) if v)
    return {
        patient: labels[min(found, key=lambda k: (prevalence[k], k))] if found else NO_FINDING
        for patient, found in positives.items()
    }


def label_histograms(site_datalists: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Per site and split: item and patient counts, and positive items per label.

    Args:
        site_datalists: ``{site_name: site_datalist}``, e.g. from :func:`partition_datalist`.
        labels: the label names, in the order of the items' multi-hot vectors.

    Returns:
        ``{site: {split: {"items": n, "patients": n, "label_counts": {label: n, ..., "No Finding": n}}}}``
        where a label's count is its number of positive items and "No Finding" counts items with
        no positive label.
    """
    histograms: dict[str, Any] = {}
    for name, site in site_datalists.items():
        histograms[name] = {}
        for split in SPLITS:
            items = site.get(split, [])
            counts = dict(zip(labels, map(int, _label_totals(items, len(labels)))))
            counts[NO_FINDING] = sum(1 for item in items if not any(item["label"]))
            histograms[name][split] = {
                "items": len(items),
                "patients": len({_patient_id(item) for item in items}),
                "label_counts": counts,
            }
    return histograms


def write_partition(
    datalist_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_sites: int | None,
    strategy: str,
    alpha: float,
    seed: int,
    min_site_size: int,
    field: str = "site",
    name: str | None = None,
) -> Path:
    """Partition a datalist file and write the sites' datalists, a manifest and label histograms.

    ``out_dir`` receives ``<site>.json`` per site, ``manifest.json``, ``histograms.json`` and
    ``histograms.png``. It appears complete or not at all: every check runs before it is created,
    and an existing ``out_dir`` is replaced only on success. The same inputs give byte-identical files.

    Args:
        datalist_path: the datalist JSON; recorded in the manifest exactly as passed.
        out_dir: the partition folder to create (replaced if it exists).
        num_sites, strategy, alpha, seed, min_site_size, field: see :func:`partition_datalist`.
        name: the partition's name in the manifest; by default built from the parameters,
            e.g. ``"dirichlet-4sites-alpha0.5-seed0"``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        InputError: an unreadable or malformed datalist, or any error of :func:`partition_datalist`.
    """
    datalist = read_datalist(datalist_path)
    sites = partition_datalist(datalist, num_sites, strategy, alpha, seed, min_site_size, field)
    used = _PARAMETERS_USED[strategy]
    spec = {
        "strategy": strategy,
        "num_sites": None if num_sites is None else int(num_sites),
        "alpha": float(alpha) if "alpha" in used else None,
        "seed": int(seed) if "seed" in used else None,
        "min_site_size": int(min_site_size),
        "field": field if "field" in used else None,
    }
    settings = [f"{key}={spec[key]}" for key in ("alpha", "seed", "field") if spec[key] is not None]
    if name is None:
        name = "-".join([strategy, f"{len(sites)}sites", *(s.replace("=", "") for s in settings)])
    histograms = label_histograms(sites, datalist["labels"])
    manifest = {
        "name": name,
        "tool": {"package": "monai_fl_ext", "version": __version__},
        "spec": spec,
        "input": {"datalist": os.fspath(datalist_path), "sha256": sha256_file(datalist_path)},
        "labels": list(datalist["labels"]),
        "sites": [_site_summary(site_name, site, histograms[site_name]) for site_name, site in sites.items()],
        "histograms": HISTOGRAMS_JSON,
        "figure": HISTOGRAMS_PNG,
    }
    png = _positive_rate_png(histograms, datalist["labels"], f"{strategy} partition ({', '.join(settings)})")
    with atomic_output_dir(out_dir) as tmp:
        for site_name, site in sites.items():
            atomic_write_json(tmp / f"{site_name}.json", site)
        atomic_write_json(tmp / HISTOGRAMS_JSON, histograms)
        atomic_write_bytes(tmp / HISTOGRAMS_PNG, png)
        atomic_write_json(tmp / MANIFEST, manifest)
    return Path(out_dir)


def load_manifest(partition_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a partition folder's ``manifest.json``.

    Args:
        partition_dir: a folder written by :func:`write_partition`.

    Returns:
        The manifest.

    Raises:
        InputError: the manifest is missing, not JSON, or has no ``sites`` list.
    """
    path = Path(partition_dir) / MANIFEST
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sites"), list):
        raise InputError(f"{path}: not a partition manifest (no 'sites' list)")
    return manifest


def read_site_datalist(partition_dir: str | os.PathLike, site: str) -> dict[str, Any]:
    """Read one site's datalist from a partition folder.

    Args:
        partition_dir: a folder written by :func:`write_partition`.
        site: the site's name, e.g. ``"site-1"``.

    Returns:
        The site's datalist.

    Raises:
        InputError: the site is not in the manifest, or its datalist is missing or malformed.
    """
    sites = {entry["name"]: entry for entry in load_manifest(partition_dir)["sites"]}
    if site not in sites:
        raise InputError(f"site {site!r} is not in {Path(partition_dir) / MANIFEST} (sites: {', '.join(sites)})")
    return read_datalist(Path(partition_dir) / sites[site]["file"])


def _check_parameters(
    strategy: str, num_sites: int | None, alpha: float, seed: int, min_site_size: int, field: str
) -> None:
    if strategy not in STRATEGIES:
        raise InputError(f"strategy={strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    used = _PARAMETERS_USED[strategy]
    if not (num_sites is None and strategy == "natural") and not (_is_int(num_sites) and num_sites >= 1):
        allowed = "an integer >= 1 or None" if strategy == "natural" else "an integer >= 1"
        raise InputError(f"num_sites={num_sites!r} must be {allowed}")
    is_number = isinstance(alpha, (int, float, np.number)) and not isinstance(alpha, bool)
    if "alpha" in used and not (is_number and math.isfinite(alpha) and alpha > 0):
        raise InputError(f"alpha={alpha!r} must be a finite number > 0")
    if "seed" in used and not (_is_int(seed) and seed >= 0):
        raise InputError(f"seed={seed!r} must be an integer >= 0")
    if not (_is_int(min_site_size) and min_site_size >= 0):
        raise InputError(f"min_site_size={min_site_size!r} must be an integer >= 0")
    if "field" in used and not (isinstance(field, str) and field):
        raise InputError(f"field={field!r} must be a non-empty item field name")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _patient_id(item: Mapping[str, Any]) -> str:
    patient = item.get("patient")
    return item["image"] if patient is None else str(patient)


def _all_items(datalist: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [item for split in SPLITS for item in datalist.get(split, [])]


def _patients(datalist: Mapping[str, Any]) -> list[str]:
    # Sorted so that the shuffle, not dict or file order, decides the assignment.
    return sorted({_patient_id(item) for item in _all_items(datalist)})


def _label_totals(items: Sequence[Mapping[str, Any]], num_labels: int) -> np.ndarray:
    return np.asarray([item["label"] for item in items], dtype=np.int64).reshape(-1, num_labels).sum(axis=0)


def _shuffled(members: Sequence[str], rng: np.random.Generator) -> list[str]:
    return [members[k] for k in rng.permutation(len(members))]


def _primary_class_groups(datalist: Mapping[str, Any], patients: Sequence[str]) -> list[list[str]]:
    """Sorted patients grouped by primary class, groups in label order then "No Finding"."""
    classes = primary_classes(datalist)
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for patient in patients:
        groups[classes[patient]].append(patient)
    return [groups[c] for c in [*datalist["labels"], NO_FINDING] if c in groups]


def _field_groups(datalist: Mapping[str, Any], patients: Sequence[str], field: str) -> list[list[str]]:
    """Sorted patients grouped by their value of item field ``field``, groups in sorted value order.

    Raises:
        InputError: an item lacks the field, or a patient's items disagree on it (naming split, index and patient).
    """
    value_of: dict[str, str] = {}
    for split in SPLITS:
        for i, item in enumerate(datalist.get(split, [])):
            if field not in item:
                raise InputError(f"field={field!r}: {split}[{i}] (image {item['image']!r}) has no {field!r} value")
            patient, value = _patient_id(item), str(item[field])
            first = value_of.setdefault(patient, value)
            if first != value:
                raise InputError(f"field={field!r}: patient {patient!r} has {field} {first!r} and {value!r} ({split}[{i}]); "
                                 "dirichlet_field needs one value per patient")
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for patient in patients:
        groups[value_of[patient]].append(patient)
    return [groups[v] for v in sorted(groups)]


def _draw_dirichlet_runs(
    datalist: Mapping[str, Any],
    groups: Sequence[Sequence[str]],
    num_sites: int,
    strategy: str,
    alpha: float,
    seed: int,
    min_training: int,
    rng: np.random.Generator,
) -> dict[str, int]:
    """Cut each shuffled group across sites at Dirichlet(alpha) proportions, redrawing until sites are big enough."""
    training_items = Counter(_patient_id(item) for item in datalist.get("training", []))
    for _ in range(MAX_DRAWS):
        site_index: dict[str, int] = {}
        for group in groups:
            members = _shuffled(group, rng)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, float(alpha))))[:-1] * len(members)).astype(int)
            bounds = [0, *cuts.tolist(), len(members)]
            for k in range(num_sites):
                site_index.update(dict.fromkeys(members[bounds[k] : bounds[k + 1]], k))
        sizes = np.zeros(num_sites, dtype=np.int64)
        for patient, count in training_items.items():
            sizes[site_index[patient]] += count
        if sizes.min() >= min_training:
            return site_index
    raise InputError(
        f"strategy={strategy!r} with alpha={alpha} cannot give each of num_sites={num_sites} sites at least "
        f"min_site_size={min_training} training items ({MAX_DRAWS} draws from seed={seed}); "
        "raise alpha, or lower min_site_size or num_sites"
    )


def _natural_sites(datalist: Mapping[str, Any], field: str) -> dict[str, str]:
    """Each patient's site, read from the item field ``field``."""
    site_of: dict[str, str] = {}
    for split in SPLITS:
        for i, item in enumerate(datalist.get(split, [])):
            where = f"{split}[{i}] (image {item['image']!r})"
            if field not in item:
                raise InputError(f"field={field!r}: {where} has no {field!r} value")
            site = item[field]
            if not (isinstance(site, str) and _SITE_NAME.fullmatch(site)) or site in _RESERVED_SITE_NAMES:
                raise InputError(
                    f"field={field!r}: {where} has {field} {site!r}, which cannot name a site "
                    f"(letters, digits, '.', '_', '-'; not {', '.join(sorted(_RESERVED_SITE_NAMES))})"
                )
            patient = _patient_id(item)
            first = site_of.setdefault(patient, site)
            if first != site:
                raise InputError(
                    f"field={field!r}: patient {patient!r} is at {first!r} and at {site!r} ({where}); "
                    "a patient must belong to one site"
                )
    return site_of


def _split_by_site(
    datalist: Mapping[str, Any], site_of: Mapping[str, str], site_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    sites = {name: {"labels": list(datalist["labels"]), **{split: [] for split in SPLITS}} for name in site_names}
    for split in SPLITS:
        for item in datalist.get(split, []):
            sites[site_of[_patient_id(item)]][split].append(copy.deepcopy(item))
    return sites


def _site_summary(name: str, site: Mapping[str, Any], histogram: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "file": f"{name}.json",
        "items": {split: histogram[split]["items"] for split in SPLITS},
        "patients": {
            **{split: histogram[split]["patients"] for split in SPLITS},
            "total": len(_patients(site)),
        },
    }


def _positive_rate_png(histograms: Mapping[str, Any], labels: Sequence[str], title: str) -> bytes:
    """Heatmap of each label's positive rate in each site's training split, as deterministic PNG bytes."""
    rows = [*labels, NO_FINDING]
    sites = list(histograms)
    training = [histograms[site]["training"] for site in sites]
    rates = np.array([[h["label_counts"][row] / max(h["items"], 1) for h in training] for row in rows])
    fig = Figure(figsize=(min(3 + 0.7 * len(sites), 30), 1 + 0.35 * len(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="positive rate (training items)")
    if len(sites) <= 12:  # beyond that the numbers no longer fit in the cells
        top = rates.max()
        for (r, s), rate in np.ndenumerate(rates):
            ax.text(s, r, f"{rate:.2f}", ha="center", va="center", fontsize=7, color="k" if rate > 0.6 * top else "w")
    buffer = io.BytesIO()
    # Matplotlib otherwise stamps its version into the PNG, so bytes would change with the install.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
