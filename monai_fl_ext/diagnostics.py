"""Client-drift diagnostics of one round: each site's update norm and the pairwise cosine similarity."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten_update(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """All floating-point entries of an update, in sorted key order, as one float64 vector."""
    parts = [np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(update) if np.issubdtype(np.asarray(update[k]).dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def drift_diagnostics(updates: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """Update L2 norms and pairwise cosine similarities between site updates.

    Args:
        updates: ``{site: {param: diff}}`` for the sites aggregated this round.

    Returns:
        ``{"sites": [...], "update_norm": {site: float}, "cosine": [[float]]}`` (cosine rows and
        columns in ``sites`` order; 0 where an update is all zeros).
    """
    sites = sorted(updates)
    vectors = [flatten_update(updates[s]) for s in sites]
    norms = [float(np.linalg.norm(v)) for v in vectors]
    cosine = [
        [float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0 for b, nb in zip(vectors, norms)]
        for a, na in zip(vectors, norms)
    ]
    return {"sites": sites, "update_norm": dict(zip(sites, norms)), "cosine": cosine}
