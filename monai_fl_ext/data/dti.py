"""Drug-target interaction (DTI) data: a synthetic generator, loaders for TDC's CSVs, RDKit featurisation.

CSV format (as TDC distributes DAVIS, KIBA and BindingDB through ``tdc.multi_pred.DTI(name=...).get_data()``):
one row per measured pair with the columns

- ``Drug_ID``: compound id (PubChem CID in DAVIS, ChEMBL id in KIBA, BindingDB monomer id);
- ``Drug``: the compound as SMILES;
- ``Target_ID``: protein id (gene name in DAVIS, UniProt accession in KIBA);
- ``Target``: the protein's amino-acid sequence (one-letter codes);
- ``Y``: the affinity, whose unit depends on the data set (see :data:`AFFINITY_UNITS`).

Extra columns are kept when known: ``Drug_Family`` and ``Target_Family`` (written by the synthetic
generator, used to partition by chemistry). Without ``Drug_Family`` a drug's family is its Bemis-Murcko
scaffold (RDKit), so real data sets partition by scaffold too.

Affinity units and the binary label (``--affinity``):

- ``nM`` (DAVIS ``Y``, BindingDB_Kd/Ki/IC50 ``Y``): a dissociation constant Kd (or Ki, IC50) in nanomolar.
  It is converted to ``pKd = -log10(Kd [M]) = 9 - log10(Kd [nM])``; the label is ``pKd >= 7`` (Kd <= 100 nM),
  the usual DAVIS threshold. DAVIS' 10,000 nM entries ("no binding detected") become pKd 5, negatives.
- ``p``: already on the log scale (TDC's ``convert_to_log``, or pKd/pKi columns); threshold 7.
- ``kiba``: the KIBA score (larger means stronger binding); label ``KIBA >= 12.1`` (Tang et al. 2014's cut-off
  as used by He et al. 2017).

Duplicate (drug, target) rows, common in BindingDB, are merged by the mean of their log-scale affinity.

Featurisation (deterministic, documented in the dataset's ``featurisation.json``):

- drug: RDKit Morgan fingerprint, radius 2 (ECFP4-like), 1024 bits, as 0/1 floats
  (``rdFingerprintGenerator.GetMorganGenerator(radius, fpSize)``);
- target: k-mer composition over the 20 standard amino acids, k = 2 (400 dimer counts), each count divided by
  its expected value under a uniform composition, ``(L - k + 1) / 20**k``, so a feature averages 1.

The network sees the concatenation (1024 + 400 = 1424 channels) as a 1D signal of length 1: a hashed fingerprint
has no locality along its bit index, so it is not convolved along it; see the bundle's README.

Bad input: a SMILES RDKit cannot parse (or that has no atoms), a sequence with a character outside the 20 standard
residues (``X``, ``B``, ``Z``, ``U``, ``O``, gaps...), a missing or non-numeric ``Y`` or a non-positive Kd raise
:class:`~monai_fl_ext.errors.InputError` naming the file, the row (1-based line number) and the value. With
``on_invalid="skip"`` such rows are left out instead, and each skipped row is listed with its reason in
``featurisation.json``; nothing malformed ever reaches training.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_fl_ext.data.datalist import SPLITS, validate_datalist
from monai_fl_ext.data.splits import check_fractions
from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_output_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, to_json

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
CSV_COLUMNS = ("Drug_ID", "Drug", "Target_ID", "Target", "Y")
FAMILY_COLUMNS = ("Drug_Family", "Target_Family")
LABELS = ["interaction"]
AFFINITY_UNITS = ("nM", "p", "kiba")
DEFAULT_THRESHOLDS = {"nM": 7.0, "p": 7.0, "kiba": 12.1}
ON_INVALID = ("error", "skip")
FEATURES_DIR = "features"
FEATURISATION = "featurisation.json"
DATALIST = "datalist.json"
CSV_NAME = "dti.csv"

# Synthetic chemistry: scaffold families as SMILES templates whose {R1}/{R2} slots take substituents.
# Substituent ring closures use digits 8 and 9 so they never clash with the scaffold's ring bonds.
DRUG_FAMILIES: dict[str, str] = {
    "benzamide": "O=C(N({R1}))c1ccc({R2})cc1",
    "sulfonamide": "O=S(=O)(N({R1}))c1ccc({R2})cc1",
    "indole": "c1cc({R2})c2c(c1)cc({R1})[nH]2",
    "quinazoline": "c1cc({R1})c2c(c1)ncnc2N({R2})",
    "aminopyrimidine": "Nc1nc({R1})cc({R2})n1",
    "piperazine": "O=C({R1})N1CCN({R2})CC1",
    "thiophene": "c1sc({R1})cc1C(=O)N({R2})",
    "purine": "Nc1nc({R1})c2nc({R2})[nH]c2n1",
}
SUBSTITUENTS: tuple[str, ...] = (
    "C", "CC", "CCC", "C(C)C", "O", "OC", "OCC", "N", "NC", "F", "Cl", "Br", "C#N", "C(F)(F)F", "C(=O)O",
    "C(=O)N", "S(C)(=O)=O", "c9ccccc9", "c9ccncc9", "C9CC9", "C9CCCC9", "N9CCOCC9", "N9CCCC9", "CO", "CCN",
)
TARGET_FAMILIES: tuple[str, ...] = ("kinase", "gpcr", "protease", "nuclear_receptor", "ion_channel", "phosphodiesterase")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")


# ---- featurisation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Featurizer:
    """The deterministic drug and target encodings.

    Args:
        radius: Morgan fingerprint radius (2 is ECFP4-like).
        n_bits: fingerprint length.
        k: protein k-mer length (2: 400 dimers; 3: 8000 trimers).
    """

    radius: int = 2
    n_bits: int = 1024
    k: int = 2

    def __post_init__(self) -> None:
        for name, value, low in (("radius", self.radius, 0), ("n_bits", self.n_bits, 8), ("k", self.k, 1)):
            if not (isinstance(value, int) and value >= low):
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.k > 3:
            raise InputError(f"k must be 1, 2 or 3 (20**k features), got {self.k}")

    @property
    def target_dims(self) -> int:
        """Length of the protein encoding, ``20**k``."""
        return len(AMINO_ACIDS) ** self.k

    @property
    def in_channels(self) -> int:
        """Length of the concatenated drug + target encoding (the network's input channels)."""
        return self.n_bits + self.target_dims

    def drug(self, smiles: str, where: str = "") -> np.ndarray:
        """Morgan fingerprint of ``smiles`` as a float32 0/1 vector of ``n_bits`` (see :func:`morgan_fingerprint`)."""
        return morgan_fingerprint(smiles, self.radius, self.n_bits, where)

    def target(self, sequence: str, where: str = "") -> np.ndarray:
        """k-mer composition of ``sequence`` (see :func:`kmer_composition`)."""
        return kmer_composition(sequence, self.k, where)


def parse_smiles(smiles: str, where: str = "") -> Any:
    """An RDKit molecule, or a clear error.

    Args:
        smiles: the SMILES string.
        where: file and row for the message.

    Returns:
        The ``rdkit.Chem.Mol``.

    Raises:
        InputError: RDKit cannot parse it (syntax, valence, aromaticity) or it has no atoms.
    """
    from rdkit import Chem, RDLogger

    text = smiles.strip() if isinstance(smiles, str) else ""
    if not text:
        raise InputError(f"{where}: empty SMILES")
    RDLogger.DisableLog("rdApp.*")  # the reason goes into our error, not to stderr
    try:
        mol = Chem.MolFromSmiles(text)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol is None or mol.GetNumAtoms() == 0:
        raise InputError(f"{where}: invalid SMILES {text!r} (RDKit cannot parse it: syntax, ring closure, valence or aromaticity)")
    return mol


def morgan_fingerprint(smiles: str, radius: int = 2, n_bits: int = 1024, where: str = "") -> np.ndarray:
    """Morgan (circular) fingerprint bits of a SMILES.

    Args:
        smiles: the compound.
        radius: fingerprint radius (2: ECFP4-like).
        n_bits: fingerprint length.
        where: file and row for error messages.

    Returns:
        float32 array of shape ``(n_bits,)`` with 0/1 entries.

    Raises:
        InputError: the SMILES is invalid (see :func:`parse_smiles`).
    """
    from rdkit.Chem import rdFingerprintGenerator

    mol = parse_smiles(smiles, where)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return generator.GetFingerprintAsNumPy(mol).astype(np.float32)


def murcko_scaffold(smiles: str, where: str = "") -> str:
    """Bemis-Murcko scaffold SMILES (ring systems and linkers) of a compound; ``"acyclic"`` without rings.

    Raises:
        InputError: the SMILES is invalid.
    """
    from rdkit.Chem.Scaffolds import MurckoScaffold

    scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=parse_smiles(smiles, where))
    return scaffold or "acyclic"


def kmer_composition(sequence: str, k: int = 2, where: str = "") -> np.ndarray:
    """Relative k-mer counts of a protein sequence over the 20 standard amino acids.

    Feature ``i`` is the count of the ``i``-th k-mer (lexicographic in ``ACDEFGHIKLMNPQRSTVWY``) divided by
    ``(L - k + 1) / 20**k``, its expected count in a uniform random sequence of length ``L``.

    Args:
        sequence: one-letter amino-acid codes; case and surrounding whitespace are ignored.
        k: k-mer length.
        where: file and row for error messages.

    Returns:
        float32 array of shape ``(20**k,)``.

    Raises:
        InputError: a character outside the 20 standard residues (named with its 1-based position), or a
            sequence shorter than ``k``.
    """
    seq = sequence.strip().upper() if isinstance(sequence, str) else ""
    index = {a: i for i, a in enumerate(AMINO_ACIDS)}
    codes = np.fromiter((index.get(c, -1) for c in seq), dtype=np.int64, count=len(seq))
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        chars = sorted({seq[i] for i in bad})
        raise InputError(f"{where}: protein sequence has unknown residue(s) {''.join(chars)!r} (first at position {bad[0] + 1} "
                         f"of {len(seq)}); only the 20 standard amino acids {AMINO_ACIDS} are encoded")
    if len(seq) < k:
        raise InputError(f"{where}: protein sequence of length {len(seq)} is shorter than k={k}")
    ids = np.zeros(len(seq) - k + 1, dtype=np.int64)
    for j in range(k):
        ids = ids * len(AMINO_ACIDS) + codes[j : len(seq) - k + 1 + j]
    dims = len(AMINO_ACIDS) ** k
    counts = np.bincount(ids, minlength=dims).astype(np.float64)
    return (counts * dims / len(ids)).astype(np.float32)


# ---- real-format loading -------------------------------------------------------------------------------
def to_log_affinity(value: float, unit: str) -> float:
    """Affinity on the scale the threshold applies to: pKd for ``nM`` (``9 - log10(Kd_nM)``), unchanged otherwise.

    Raises:
        InputError: unknown unit, or a non-positive concentration.
    """
    if unit not in AFFINITY_UNITS:
        raise InputError(f"affinity unit must be one of {AFFINITY_UNITS}, got {unit!r}")
    if unit == "nM":
        if not value > 0:
            raise InputError(f"Kd must be > 0 nM, got {value}")
        return 9.0 - math.log10(value)
    return float(value)


@dataclass
class DTIRecord:
    """One measured pair after validation: ``affinity`` on the log scale of its unit (pKd for nM)."""

    drug_id: str
    smiles: str
    target_id: str
    sequence: str
    affinity: float
    drug_family: str | None = None
    target_family: str | None = None
    rows: list[int] = field(default_factory=list)


def read_dti_csv(
    path: str | os.PathLike,
    affinity: str = "nM",
    on_invalid: str = "error",
    featurizer: Featurizer | None = None,
) -> tuple[list[DTIRecord], list[dict[str, Any]]]:
    """Read and validate a TDC-style DTI CSV (DAVIS, KIBA, BindingDB, or the synthetic generator's).

    Every row's SMILES is parsed by RDKit and its sequence checked for unknown residues here, so a bad row
    is reported with its line number before anything is written or trained.

    Args:
        path: the CSV with columns ``Drug_ID, Drug, Target_ID, Target, Y`` (and optionally
            ``Drug_Family``, ``Target_Family``).
        affinity: unit of ``Y``: ``nM``, ``p`` or ``kiba`` (see the module docstring).
        on_invalid: ``error`` (raise on the first bad row) or ``skip`` (leave bad rows out and report them).
        featurizer: its ``k`` bounds the shortest valid sequence (default :class:`Featurizer`).

    Returns:
        ``(records, skipped)``: one record per distinct (drug, target) pair, duplicates merged by the mean
        log affinity, in order of first appearance; ``skipped`` lists ``{"line", "reason"}`` of left-out rows.

    Raises:
        InputError: naming the file and line: missing columns, a bad SMILES or sequence (with ``error``), a
            missing or non-numeric ``Y``, a drug or target id given two different structures, or no valid row.
    """
    path = Path(path)
    if on_invalid not in ON_INVALID:
        raise InputError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    if affinity not in AFFINITY_UNITS:
        raise InputError(f"affinity must be one of {AFFINITY_UNITS}, got {affinity!r}")
    featurizer = featurizer or Featurizer()
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found") from e
    pairs: dict[tuple[str, str], DTIRecord] = {}
    values: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    smiles_of: dict[str, tuple[str, int]] = {}
    sequence_of: dict[str, tuple[str, int]] = {}
    checked_smiles: dict[str, str | None] = {}
    checked_sequences: dict[str, str | None] = {}
    skipped: list[dict[str, Any]] = []
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; a TDC DTI CSV has {', '.join(CSV_COLUMNS)} "
                             f"(found {reader.fieldnames})")
        for row in reader:
            line = reader.line_num
            where = f"{path}: line {line}"
            try:
                record = _parse_row(row, where, affinity, featurizer, checked_smiles, checked_sequences)
            except InputError as e:
                if on_invalid == "error":
                    raise
                skipped.append({"line": line, "reason": str(e).removeprefix(f"{where}: ")})
                continue
            for ident, structure, table, kind in ((record.drug_id, record.smiles, smiles_of, "drug"),
                                                  (record.target_id, record.sequence, sequence_of, "target")):
                first = table.setdefault(ident, (structure, line))
                if first[0] != structure:
                    raise InputError(f"{where}: {kind} id {ident!r} has a different {'SMILES' if kind == 'drug' else 'sequence'} "
                                     f"than at line {first[1]}; ids must name one structure")
            key = (record.drug_id, record.target_id)
            values[key].append(record.affinity)
            if key in pairs:
                pairs[key].rows.append(line)
            else:
                record.rows = [line]
                pairs[key] = record
    if not pairs:
        raise InputError(f"{path}: no valid rows" + (f" ({len(skipped)} skipped, first: line {skipped[0]['line']}: "
                                                      f"{skipped[0]['reason']})" if skipped else ""))
    for key, record in pairs.items():
        record.affinity = float(np.mean(values[key]))
    return list(pairs.values()), skipped


def _parse_row(row: Mapping[str, str | None], where: str, affinity: str, featurizer: Featurizer,
               checked_smiles: dict[str, str | None], checked_sequences: dict[str, str | None]) -> DTIRecord:
    drug_id, target_id = (row.get("Drug_ID") or "").strip(), (row.get("Target_ID") or "").strip()
    if not drug_id or not target_id:
        raise InputError(f"{where}: empty Drug_ID or Target_ID")
    smiles, sequence = (row.get("Drug") or "").strip(), (row.get("Target") or "").strip().upper()
    for text, cache, check in ((smiles, checked_smiles, lambda s: parse_smiles(s, where)),
                               (sequence, checked_sequences, lambda s: kmer_composition(s, featurizer.k, where))):
        if text not in cache:
            try:
                check(text)
                cache[text] = None
            except InputError as e:
                cache[text] = str(e).removeprefix(f"{where}: ")
        if cache[text] is not None:
            raise InputError(f"{where}: {cache[text]}")
    raw = (row.get("Y") or "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{where}: Y {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: Y {raw!r} is not finite")
    try:
        log_value = to_log_affinity(value, affinity)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    return DTIRecord(drug_id, smiles, target_id, sequence, log_value,
                     (row.get("Drug_Family") or "").strip() or None, (row.get("Target_Family") or "").strip() or None)


def _file_stem(ident: str) -> str:
    """A file name for an id: the id itself when it is safe, else a readable prefix plus a short hash."""
    if _SAFE_ID.fullmatch(ident):
        return ident
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", ident)[:40].lstrip("._-") or "id"
    return f"{clean}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def build_dti_dataset(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    affinity: str = "nM",
    threshold: float | None = None,
    featurizer: Featurizer | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    on_invalid: str = "error",
) -> dict[str, Any]:
    """Featurise a DTI CSV into ``out_dir``: per-drug and per-target ``.npy`` files and a MONAI datalist.

    ``out_dir/features/drugs/<Drug_ID>.npy`` holds a drug's fingerprint as a ``(n_bits, 1)`` array and
    ``out_dir/features/targets/<Target_ID>.npy`` a target's k-mer composition as ``(20**k, 1)``; the bundle
    loads both and concatenates them along the channel axis. ``out_dir/datalist.json`` has one item per pair::

        {"image": "features/drugs/D.npy", "target": "features/targets/T.npy", "label": [0 or 1],
         "patient": drug id, "drug_id", "target_id", "drug_family", "scaffold", "target_family", "affinity"}

    ``patient`` is the drug, so a partition keeps all of a compound's measurements at one site (a company owns
    its compounds); ``drug_family`` (the CSV's ``Drug_Family``, else the Murcko scaffold) is the field to skew
    sites' chemistry by. Pairs are split at random into training/validation/test at ``fractions`` (TDC's
    "random" split) with ``numpy.random.default_rng(seed)`` over the pairs sorted by (drug, target).
    ``out_dir/featurisation.json`` records the settings, counts and skipped rows. The features folder is
    replaced atomically; the same inputs give byte-identical files.

    Args:
        csv_path: the TDC-style CSV (see :func:`read_dti_csv`).
        out_dir: dataset folder (the bundle's ``dataset_dir``); may be the CSV's folder.
        affinity: unit of ``Y``: ``nM``, ``p`` or ``kiba``.
        threshold: label threshold on the log-scale affinity (default: 7 for ``nM``/``p``, 12.1 for ``kiba``).
        featurizer: the encodings (default radius 2, 1024 bits, k = 2).
        fractions: training, validation and test shares of the pairs.
        seed: split seed.
        on_invalid: ``error`` or ``skip`` for rows with an invalid SMILES, sequence or affinity.

    Returns:
        The datalist (also written to ``out_dir/datalist.json``).

    Raises:
        InputError: any error of :func:`read_dti_csv`, bad fractions, or a split or label class left empty.
    """
    featurizer = featurizer or Featurizer()
    fractions = check_fractions(fractions, "fractions")
    if len(fractions) != len(SPLITS):
        raise InputError(f"fractions needs {len(SPLITS)} values for {SPLITS}, got {fractions}")
    threshold = DEFAULT_THRESHOLDS[affinity] if threshold is None else float(threshold)
    records, skipped = read_dti_csv(csv_path, affinity, on_invalid, featurizer)
    out_dir = Path(out_dir)
    drugs = {r.drug_id: r for r in records}
    targets = {r.target_id: r for r in records}
    drug_stem, target_stem = _unique_stems(drugs), _unique_stems(targets)
    scaffold = {d: murcko_scaffold(r.smiles) for d, r in drugs.items()}

    order = sorted(range(len(records)), key=lambda i: (records[i].drug_id, records[i].target_id))
    perm = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    bounds = [int(round(c * len(perm))) for c in np.cumsum(fractions)]
    bounds[-1] = len(perm)
    split_of: dict[int, str] = {}
    start = 0
    for split, stop in zip(SPLITS, bounds):
        split_of.update(dict.fromkeys(perm[start:stop], split))
        start = stop
    datalist: dict[str, Any] = {"labels": list(LABELS), **{s: [] for s in SPLITS}}
    for i, r in enumerate(records):
        datalist[split_of[i]].append({
            "image": f"{FEATURES_DIR}/drugs/{drug_stem[r.drug_id]}.npy",
            "target": f"{FEATURES_DIR}/targets/{target_stem[r.target_id]}.npy",
            "label": [int(r.affinity >= threshold)],
            "patient": r.drug_id,
            "drug_id": r.drug_id,
            "target_id": r.target_id,
            "drug_family": _family_name(r.drug_family or scaffold[r.drug_id]),
            "scaffold": scaffold[r.drug_id],
            "target_family": r.target_family or "unknown",
            "affinity": round(r.affinity, 6),
        })
    positives = sum(item["label"][0] for s in SPLITS for item in datalist[s])
    if positives in (0, len(records)):
        raise InputError(f"{csv_path}: every pair is {'negative' if positives == 0 else 'positive'} at threshold {threshold} "
                         f"(affinity unit {affinity!r}); check --affinity and --threshold")
    validate_datalist(datalist, str(out_dir / DATALIST))
    with atomic_output_dir(out_dir / FEATURES_DIR) as tmp:
        for ident, r in drugs.items():
            _save_npy(tmp / "drugs" / f"{drug_stem[ident]}.npy", featurizer.drug(r.smiles)[:, None])
        for ident, r in targets.items():
            _save_npy(tmp / "targets" / f"{target_stem[ident]}.npy", featurizer.target(r.sequence)[:, None])
    summary = {
        "source": os.fspath(csv_path),
        "affinity_unit": affinity,
        "label": f"{'pKd' if affinity == 'nM' else ('KIBA score' if affinity == 'kiba' else 'log affinity')} >= {threshold}",
        "threshold": threshold,
        "featurizer": {**asdict(featurizer), "drug": "RDKit Morgan fingerprint bits", "target": "relative k-mer counts",
                       "in_channels": featurizer.in_channels},
        "split": {"strategy": "random pairs", "fractions": list(fractions), "seed": seed},
        "counts": {"pairs": len(records), "drugs": len(drugs), "targets": len(targets), "positives": positives,
                   **{s: len(datalist[s]) for s in SPLITS}},
        "on_invalid": on_invalid,
        "skipped": skipped,
    }
    atomic_write_json(out_dir / FEATURISATION, summary)
    atomic_write_json(out_dir / DATALIST, datalist)
    return datalist


def _family_name(text: str) -> str:
    """Field values become parts of partition reports; keep them readable single tokens."""
    return text if _SAFE_ID.fullmatch(text) else f"scaffold-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _unique_stems(ids: Iterable[str]) -> dict[str, str]:
    stems: dict[str, str] = {}
    seen: dict[str, str] = {}
    for ident in sorted(ids):
        stem = _file_stem(ident)
        if stem.lower() in seen:  # case-insensitive file systems
            stem = f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"
        seen[stem.lower()] = ident
        stems[ident] = stem
    return stems


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


# ---- synthetic generator ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticDTISpec:
    """A synthetic DTI data set with a learnable ground truth.

    Drugs come from the scaffold families of :data:`DRUG_FAMILIES` (two substituents each); targets from the
    protein families of :data:`TARGET_FAMILIES` (mutated copies of a family consensus with a family-specific
    amino-acid composition). The true pKd of a pair is::

        pKd = base + family_effect[drug family, target family] + sum over the drug's substituents of
              substituent_effect[substituent, target family] + target_offset[target] + noise

    with family effects ~ N(0, family_scale), substituent effects ~ N(0, substituent_scale), target offsets
    ~ N(0, 0.3) and noise ~ N(0, noise); ``base`` is chosen so that ``positive_fraction`` of the pairs have
    pKd >= 7. ``Y`` is written as Kd in nM (``10**(9 - pKd)``), like DAVIS.

    Args:
        num_drugs: compounds, spread evenly over the drug families.
        num_targets: proteins, spread evenly over the target families.
        pair_fraction: share of all drug x target pairs that are measured (DAVIS is a full matrix: 1.0).
        num_drug_families: how many of :data:`DRUG_FAMILIES` are used (in order).
        num_target_families: how many of :data:`TARGET_FAMILIES` are used.
        family_scale, substituent_scale, noise: standard deviations of the affinity model (pKd units).
        positive_fraction: share of pairs with pKd >= 7.
        mutation_rate: share of a family consensus' residues substituted in each member.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
    """

    num_drugs: int = 160
    num_targets: int = 36
    pair_fraction: float = 0.8
    num_drug_families: int = 8
    num_target_families: int = 6
    family_scale: float = 2.0
    substituent_scale: float = 0.35
    noise: float = 0.3
    positive_fraction: float = 0.3
    mutation_rate: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad field."""
        checks = {
            "num_drugs": self.num_drugs >= self.num_drug_families,
            "num_targets": self.num_targets >= self.num_target_families,
            "pair_fraction": 0 < self.pair_fraction <= 1,
            "num_drug_families": 1 <= self.num_drug_families <= len(DRUG_FAMILIES),
            "num_target_families": 1 <= self.num_target_families <= len(TARGET_FAMILIES),
            "family_scale": self.family_scale >= 0, "substituent_scale": self.substituent_scale >= 0,
            "noise": self.noise >= 0, "positive_fraction": 0 < self.positive_fraction < 1,
            "mutation_rate": 0 <= self.mutation_rate < 1, "seed": self.seed >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise InputError(f"SyntheticDTISpec.{name}={getattr(self, name)!r} is out of range")
        per_family = len(SUBSTITUENTS) ** 2
        if self.num_drugs > per_family * self.num_drug_families:
            raise InputError(f"num_drugs={self.num_drugs} exceeds the {per_family} distinct compounds per family")


def generate_synthetic_dti(out_dir: str | os.PathLike, spec: SyntheticDTISpec = SyntheticDTISpec()) -> Path:
    """Write a synthetic DTI CSV in TDC's format (``out_dir/dti.csv``) and its spec (``out_dir/generation.json``).

    Columns: ``Drug_ID, Drug, Target_ID, Target, Y`` (Kd in nM) plus ``Drug_Family`` and ``Target_Family``
    and the true ``pKd``. Every SMILES is canonical and parsed by RDKit. The same spec gives byte-identical files.

    Args:
        out_dir: folder to write into (created if needed).
        spec: the data set.

    Returns:
        The CSV's path.

    Raises:
        InputError: an out-of-range spec field.
    """
    from rdkit import Chem

    spec.validate()
    rng = np.random.default_rng(spec.seed)
    drug_families = list(DRUG_FAMILIES)[: spec.num_drug_families]
    target_families = list(TARGET_FAMILIES)[: spec.num_target_families]

    drugs: list[tuple[str, str, str, tuple[int, int]]] = []  # id, smiles, family, substituent indices
    for f, family in enumerate(drug_families):
        count = spec.num_drugs // len(drug_families) + (f < spec.num_drugs % len(drug_families))
        combos = rng.permutation(len(SUBSTITUENTS) ** 2)[:count]
        for j, combo in enumerate(sorted(int(c) for c in combos)):
            r1, r2 = divmod(combo, len(SUBSTITUENTS))
            raw = DRUG_FAMILIES[family].format(R1=SUBSTITUENTS[r1], R2=SUBSTITUENTS[r2])
            smiles = Chem.MolToSmiles(parse_smiles(raw, f"synthetic drug family {family!r}"))
            drugs.append((f"{family}-{j + 1:03d}", smiles, family, (r1, r2)))

    targets: list[tuple[str, str, str]] = []
    for f, family in enumerate(target_families):
        composition = rng.dirichlet(np.full(len(AMINO_ACIDS), 0.8))
        consensus = rng.choice(len(AMINO_ACIDS), size=int(rng.integers(250, 400)), p=composition)
        count = spec.num_targets // len(target_families) + (f < spec.num_targets % len(target_families))
        for j in range(count):
            seq = consensus.copy()
            mutate = rng.random(len(seq)) < spec.mutation_rate
            seq[mutate] = rng.choice(len(AMINO_ACIDS), size=int(mutate.sum()), p=composition)
            cut = int(rng.integers(0, 30))  # members differ in length too
            targets.append((f"{family.upper().replace('_', '')[:6]}{j + 1:02d}", "".join(AMINO_ACIDS[i] for i in seq[cut:]), family))

    family_effect = rng.normal(0.0, spec.family_scale, size=(len(drug_families), len(target_families)))
    substituent_effect = rng.normal(0.0, spec.substituent_scale, size=(len(SUBSTITUENTS), len(target_families)))
    target_offset = rng.normal(0.0, 0.3, size=len(targets))
    measured = rng.random((len(drugs), len(targets))) < spec.pair_fraction
    rows = []
    for i, (drug_id, smiles, dfam, (r1, r2)) in enumerate(drugs):
        fd = drug_families.index(dfam)
        for j, (target_id, seq, tfam) in enumerate(targets):
            if not measured[i, j]:
                continue
            ft = target_families.index(tfam)
            signal = family_effect[fd, ft] + substituent_effect[r1, ft] + substituent_effect[r2, ft] + target_offset[j]
            rows.append([drug_id, smiles, target_id, seq, dfam, tfam, signal + rng.normal(0.0, spec.noise)])
    signals = np.array([r[-1] for r in rows])
    base = 7.0 - float(np.quantile(signals, 1.0 - spec.positive_fraction))
    out_dir = Path(out_dir)
    lines = [",".join([*CSV_COLUMNS, *FAMILY_COLUMNS, "pKd"])]
    for drug_id, smiles, dfam, tfam, seq, target_id, pkd in ((r[0], r[1], r[4], r[5], r[3], r[2], r[6] + base) for r in rows):
        kd_nm = 10.0 ** (9.0 - pkd)
        lines.append(",".join([drug_id, smiles, target_id, seq, f"{kd_nm:.6g}", dfam, tfam, f"{pkd:.4f}"]))
    csv_path = atomic_write_text(out_dir / CSV_NAME, "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "generation.json", to_json({"spec": asdict(spec), "base_pKd": round(base, 6), "pairs": len(rows),
                                                            "drug_families": drug_families, "target_families": target_families}))
    return csv_path
