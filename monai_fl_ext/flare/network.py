"""The server's initial global model: the bundle's own ``network_def``, so server and sites build the same network."""

from __future__ import annotations

import os
from typing import Any

import torch


def build_bundle_network(bundle_root: str, overrides: dict[str, Any] | None = None, network_key: str = "network_def") -> torch.nn.Module:
    """Instantiate ``network_key`` of ``bundle_root/configs/train.json`` with ``overrides`` (e.g. ``{"norm": "group"}``).

    FLARE's persistor calls this by path (``{"path": "monai_fl_ext.flare.network.build_bundle_network", "args": ...}``).
    The initial weights come from the bundle's ``seed`` (when it has one), so a federated run repeats.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "train.json"))
    parser.update({"bundle_root": bundle_root, **(overrides or {})})
    seed = parser.get("seed")
    with torch.random.fork_rng(devices=[]):  # seeds only this construction, not the caller's generator
        if seed is not None:
            torch.manual_seed(int(seed))
        return parser.get_parsed_content(network_key)


def bundle_model_spec(bundle_root: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """FLARE's ``{"path", "args"}`` description of :func:`build_bundle_network`."""
    return {"path": f"{__name__}.build_bundle_network", "args": {"bundle_root": bundle_root, "overrides": dict(overrides or {})}}


def _persistor_base():
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

    return PTFileModelPersistor


class BundleModelPersistor(_persistor_base()):
    """FLARE's ``PTFileModelPersistor`` for a bundle's network that keeps integer counters out of the exchange.

    BatchNorm's ``num_batches_tracked`` is a per-site step counter: averaging it is meaningless, and
    FLARE's quantisation filters reject integer tensors. Excluded keys stay at each site.

    Args:
        bundle_root: bundle folder.
        overrides: bundle config overrides for the network (e.g. ``{"norm": "group"}``).
        exclude_pattern: regular expression of state-dict keys not exchanged.
        source_ckpt_file_full_name: start from this checkpoint instead of the bundle's seeded initialisation
            (FLARE's own option: absolute, or relative to the server app's ``custom/`` folder).
    """

    def __init__(self, bundle_root: str, overrides: dict[str, Any] | None = None, exclude_pattern: str = "num_batches_tracked",
                 source_ckpt_file_full_name: str | None = None) -> None:
        super().__init__(model=bundle_model_spec(bundle_root, overrides), exclude_vars=exclude_pattern,
                         source_ckpt_file_full_name=source_ckpt_file_full_name)
        # stored under their own names (not PTFileModelPersistor's compiled pattern) so FLARE can export the job
        self.bundle_root = bundle_root
        self.overrides = dict(overrides or {})
        self.exclude_pattern = exclude_pattern
