"""The server's initial global model: the bundle's own ``network_def``, so server and sites build the same network."""

from __future__ import annotations

import os
from typing import Any

import torch


def build_bundle_network(bundle_root: str, overrides: dict[str, Any] | None = None, network_key: str = "network_def") -> torch.nn.Module:
    """Instantiate ``network_key`` of ``bundle_root/configs/train.json`` with ``overrides`` (e.g. ``{"norm": "group"}``).

    FLARE's persistor calls this by path (``{"path": "monai_fl_ext.flare.network.build_bundle_network", "args": ...}``).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "train.json"))
    parser.update({"bundle_root": bundle_root, **(overrides or {})})
    return parser.get_parsed_content(network_key)
