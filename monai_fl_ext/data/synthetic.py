"""Synthetic chest X-rays in the NIH ChestX-ray14 layout, deterministic by seed.

Each patient gets a fixed anatomy (body, lungs, heart, spine, ribs) and a set of findings with a
severity; each finding draws a distinct, learnable pattern whose strength scales with severity,
so mild cases are hard and a ResNet-18 lands well below AUC 1.0. Patients have several
follow-up images in which findings mostly persist. Labels follow NIH prevalence (majority
"No Finding"), floored at ``min_prevalence`` so rare findings still have positives in small sets.
Each patient is imaged at one of ``num_hospitals`` acquisition sites, each with its own contrast,
gamma, intensity offset and noise, so sites differ in features, not only in labels.

Output (the NIH download's layout)::

    root/images_001/images/00000001_000.png ...    up to images_per_folder per folder
    root/Data_Entry_2017.csv                       NIH columns plus "Site"
    root/train_val_list.txt, root/test_list.txt    patient-wise official-style split
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from monai_fl_ext.data.datalist import CHEST_XRAY14_LABELS, NO_FINDING
from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_output_dir

# Approximate fraction of NIH ChestX-ray14 images with each finding (Wang et al. 2017).
NIH_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.052,
    "Nodule": 0.056,
    "Pneumonia": 0.013,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030,
    "Hernia": 0.002,
}
NIH_CSV_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
    "Site",
)


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one hospital's scanner renders the same anatomy."""

    contrast: float = 1.0
    gamma: float = 1.0
    offset: float = 0.0
    noise: float = 0.05


DEFAULT_PROFILES: tuple[AcquisitionProfile, ...] = (
    AcquisitionProfile(contrast=1.0, gamma=1.0, offset=0.0, noise=0.05),
    AcquisitionProfile(contrast=0.8, gamma=1.3, offset=0.06, noise=0.08),
    AcquisitionProfile(contrast=1.15, gamma=0.8, offset=-0.04, noise=0.035),
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic cohort.

    Args:
        num_patients: patients to generate.
        image_size: square image side in pixels.
        mean_followups: mean number of extra images per patient (Poisson), capped at ``max_images_per_patient``.
        healthy_fraction: fraction of patients with no finding at all.
        min_prevalence: floor on each finding's prevalence among diseased patients' images.
        num_hospitals: acquisition sites (profiles cycle through :data:`DEFAULT_PROFILES`, jittered by seed).
        hospital_variation: apply per-site acquisition differences; False renders every site alike.
        test_fraction: fraction of patients listed in ``test_list.txt``.
        images_per_folder: images per ``images_NNN`` folder.
        seed: everything is a function of this seed.
    """

    num_patients: int = 600
    image_size: int = 64
    mean_followups: float = 1.5
    max_images_per_patient: int = 6
    healthy_fraction: float = 0.45
    min_prevalence: float = 0.02
    num_hospitals: int = 3
    hospital_variation: bool = True
    test_fraction: float = 0.2
    images_per_folder: int = 1000
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad parameter."""
        checks = {
            "num_patients": self.num_patients >= 1,
            "image_size": 16 <= self.image_size <= 1024,
            "mean_followups": self.mean_followups >= 0,
            "max_images_per_patient": self.max_images_per_patient >= 1,
            "healthy_fraction": 0 <= self.healthy_fraction < 1,
            "min_prevalence": 0 <= self.min_prevalence < 0.5,
            "num_hospitals": self.num_hospitals >= 1,
            "test_fraction": 0 <= self.test_fraction < 1,
            "images_per_folder": self.images_per_folder >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise InputError(f"synthetic generator: invalid {name}={getattr(self, name)!r}")


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) <= 1.0


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))


class _Renderer:
    """Draws one image from a patient's anatomy, findings and the site's acquisition profile."""

    def __init__(self, size: int) -> None:
        coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        self.x, self.y = np.meshgrid(coords, coords)  # y grows downwards, as in an image

    def render(self, anatomy: dict, findings: dict[str, float], profile: AcquisitionProfile, rng: np.random.Generator) -> np.ndarray:
        x = self.x + rng.normal(0, 0.02)
        y = self.y + rng.normal(0, 0.02)
        lung_scale = anatomy["lung_scale"] * (1 + 0.15 * findings.get("Emphysema", 0.0))
        body = _ellipse(x, y, 0, 0.05, 0.85, 0.95)
        img = np.where(body, 0.55, 0.05).astype(np.float32)
        lungs = np.zeros_like(img, dtype=bool)
        lung_centres = []
        for side in (-1, 1):
            cx, cy = side * anatomy["lung_dx"], -0.05
            lung = _ellipse(x, y, cx, cy, 0.28 * lung_scale, 0.55 * lung_scale)
            lungs |= lung
            lung_centres.append((cx, cy))
        ribs = 0.07 * (np.sin(y * anatomy["rib_freq"] + anatomy["rib_phase"]) > 0.6)
        img = np.where(lungs, 0.18 - 0.06 * findings.get("Emphysema", 0.0) + ribs, img)
        heart_r = 1 + 0.35 * findings.get("Cardiomegaly", 0.0)
        img = np.where(_ellipse(x, y, 0.1, 0.3, 0.3 * heart_r, 0.24 * heart_r), 0.7, img)
        img = np.where(body & (np.abs(x) < 0.045), 0.75, img)
        img = np.where(body & (y > 0.55 + 0.05 * np.cos(x * 3)), np.maximum(img, 0.6), img)
        img = img + self._findings(x, y, lungs, lung_centres, findings, anatomy)
        return self._acquire(img, profile, rng)

    def _findings(self, x, y, lungs, lung_centres, findings: dict[str, float], anatomy: dict) -> np.ndarray:
        add = np.zeros_like(x)
        place = anatomy["places"]  # per-patient lesion positions, stable across follow-ups
        (lx, ly), (rx, ry) = lung_centres
        side_x = lx if place["side"] < 0 else rx
        if s := findings.get("Atelectasis"):
            add += 0.25 * s * (np.abs(y - 0.3) < 0.04) * lungs * (np.sign(x) == place["side"])
        if s := findings.get("Effusion"):
            level = 0.45 - 0.25 * s + 0.08 * (x - side_x) ** 2
            add += 0.35 * s * (y > level) * lungs * (np.sign(x) == place["side"])
        if s := findings.get("Infiltration"):
            add += 0.2 * s * lungs * sum(_blob(x, y, bx, by, 0.06) for bx, by in place["patches"])
        if s := findings.get("Mass"):
            add += 0.35 * s * _blob(x, y, side_x + place["dx"], place["dy"], 0.11)
        if s := findings.get("Nodule"):
            add += 0.4 * s * sum(_blob(x, y, bx, by, 0.035) for bx, by in place["nodules"])
        if s := findings.get("Pneumonia"):
            add += 0.25 * s * lungs * _blob(x, y, side_x, 0.15, 0.22)
        if s := findings.get("Pneumothorax"):
            apex = lungs * (y < -0.3) * (np.sign(x) == place["side"])
            add += -0.14 * s * apex + 0.2 * s * (np.abs(y + 0.3) < 0.02) * lungs * (np.sign(x) == place["side"])
        if s := findings.get("Consolidation"):
            add += 0.3 * s * _ellipse(x, y, side_x - place["dx"], 0.05, 0.14, 0.1) * lungs
        if s := findings.get("Edema"):
            add += 0.2 * s * lungs * (_blob(x, y, lx * 0.6, 0.0, 0.18) + _blob(x, y, rx * 0.6, 0.0, 0.18))
        if s := findings.get("Fibrosis"):
            grid = (np.sin(x * 40) * np.sin(y * 40) > 0.5) * (y > 0.1)
            add += 0.12 * s * grid * lungs
        if s := findings.get("Pleural_Thickening"):
            for cx, cy in lung_centres:
                r = (((x - cx) / (0.28 * anatomy["lung_scale"])) ** 2 + ((y - cy) / (0.55 * anatomy["lung_scale"])) ** 2) ** 0.5
                add += 0.2 * s * (np.abs(r - 0.95) < 0.06)
        if s := findings.get("Hernia"):
            add += 0.3 * s * _blob(x, y, 0.0, 0.45, 0.09)
        return add

    @staticmethod
    def _acquire(img: np.ndarray, profile: AcquisitionProfile, rng: np.random.Generator) -> np.ndarray:
        img = img + rng.normal(0, profile.noise, img.shape)
        img = np.clip(img * profile.contrast + profile.offset, 0, 1) ** profile.gamma
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _profiles(spec: SyntheticSpec, rng: np.random.Generator) -> list[AcquisitionProfile]:
    if not spec.hospital_variation:
        return [DEFAULT_PROFILES[0]] * spec.num_hospitals
    profiles = []
    for h in range(spec.num_hospitals):
        base = DEFAULT_PROFILES[h % len(DEFAULT_PROFILES)]
        jitter = 0.0 if h < len(DEFAULT_PROFILES) else 1.0
        profiles.append(
            AcquisitionProfile(
                contrast=base.contrast * (1 + jitter * rng.uniform(-0.1, 0.1)),
                gamma=base.gamma * (1 + jitter * rng.uniform(-0.15, 0.15)),
                offset=base.offset + jitter * rng.uniform(-0.03, 0.03),
                noise=base.noise * (1 + jitter * rng.uniform(-0.3, 0.3)),
            )
        )
    return profiles


def _sample_findings(spec: SyntheticSpec, rng: np.random.Generator, labels: Sequence[str]) -> dict[str, float]:
    if rng.random() < spec.healthy_fraction:
        return {}
    diseased = 1 - spec.healthy_fraction
    p = np.array([max(NIH_PREVALENCE[name], spec.min_prevalence) / diseased for name in labels]).clip(0, 0.9)
    while True:
        hits = rng.random(len(labels)) < p
        if hits.any():
            break
    return {labels[i]: float(rng.uniform(0.15, 1.0)) for i in np.flatnonzero(hits)}


def _anatomy(rng: np.random.Generator) -> dict:
    side = rng.choice([-1, 1])
    return {
        "lung_scale": rng.uniform(0.9, 1.1),
        "lung_dx": rng.uniform(0.34, 0.42),
        "rib_freq": rng.uniform(18, 26),
        "rib_phase": rng.uniform(0, 2 * np.pi),
        "places": {
            "side": int(side),
            "dx": rng.uniform(-0.08, 0.08),
            "dy": rng.uniform(-0.35, 0.25),
            "patches": [(side * rng.uniform(0.2, 0.5), rng.uniform(-0.4, 0.3)) for _ in range(4)],
            "nodules": [(s * rng.uniform(0.25, 0.5), rng.uniform(-0.4, 0.3)) for s in rng.choice([-1, 1], rng.integers(1, 4))],
        },
    }


def _follow_up(findings: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """Findings mostly persist between visits, with a drifting severity."""
    kept = {k: float(np.clip(s + rng.normal(0, 0.1), 0.1, 1.0)) for k, s in findings.items() if rng.random() < 0.85}
    return kept or ({} if not findings else dict([next(iter(findings.items()))]))


def generate_synthetic_cxr(out_dir: str | os.PathLike, spec: SyntheticSpec | None = None, progress: bool = True) -> Path:
    """Write a synthetic ChestX-ray14-format cohort to ``out_dir`` (replaced atomically).

    Args:
        out_dir: destination folder; built under a temporary name and renamed when complete.
        spec: cohort parameters (defaults: :class:`SyntheticSpec`).
        progress: show a progress bar.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        InputError: a parameter of ``spec`` is out of range.
    """
    spec = spec or SyntheticSpec()
    spec.validate()
    labels = CHEST_XRAY14_LABELS
    rng = np.random.default_rng(spec.seed)
    profiles = _profiles(spec, rng)
    renderer = _Renderer(spec.image_size)
    rows: list[list[str]] = []
    test_patients: set[int] = set()
    with atomic_output_dir(out_dir) as tmp:
        index = 0
        for patient in tqdm(range(1, spec.num_patients + 1), desc="synthetic CXR patients", disable=not progress):
            prng = np.random.default_rng([spec.seed, patient])
            anatomy = _anatomy(prng)
            hospital = int(prng.integers(spec.num_hospitals))
            age, gender = int(prng.integers(18, 90)), str(prng.choice(["M", "F"]))
            if prng.random() < spec.test_fraction:
                test_patients.add(patient)
            findings = _sample_findings(spec, prng, labels)
            n_images = min(1 + int(prng.poisson(spec.mean_followups)), spec.max_images_per_patient)
            for visit in range(n_images):
                if visit:
                    findings = _follow_up(findings, prng)
                name = f"{patient:08d}_{visit:03d}.png"
                folder = tmp / f"images_{index // spec.images_per_folder + 1:03d}" / "images"
                folder.mkdir(parents=True, exist_ok=True)
                pixels = renderer.render(anatomy, findings, profiles[hospital], prng)
                Image.fromarray(pixels, mode="L").save(folder / name)
                finding_text = "|".join(k for k in labels if k in findings) or NO_FINDING
                view = "PA" if prng.random() < 0.6 else "AP"
                rows.append([name, finding_text, str(visit), str(patient), str(age + visit), gender, view,
                             str(spec.image_size), str(spec.image_size), "0.143", "0.143", f"hospital-{hospital + 1}"])
                index += 1
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(NIH_CSV_COLUMNS)
        writer.writerows(rows)
        (tmp / "Data_Entry_2017.csv").write_text(buf.getvalue())
        (tmp / "test_list.txt").write_text("".join(r[0] + "\n" for r in rows if int(r[3]) in test_patients))
        (tmp / "train_val_list.txt").write_text("".join(r[0] + "\n" for r in rows if int(r[3]) not in test_patients))
    return Path(out_dir)
