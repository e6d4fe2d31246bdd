"""The ClientAlgo: MONAI's ``MonaiAlgo`` running any bundle, plus named hooks for what FL adds.

``MonaiAlgo`` already loads global weights, continues the ignite state across rounds, computes the
weight diff and counts the iterations of the round; this subclass keeps all of that and adds:

- ``local_term``: the algorithm's local term (FedProx, SCAFFOLD), see :mod:`monai_fl_ext.algorithms`;
- ``configure_training``: where DP-SGD wraps network, optimizer and loader (overridden by privacy);
- ``protect_update``: the last step before an update leaves the site (secure masking hooks in here);
- per-site data and outputs through bundle overrides, so the bundle itself stays unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai.fl.client  # noqa: F401  `import monai` does not load monai.fl
import torch
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics
from monai.fl.utils.exchange_object import ExchangeObject

from monai_fl_ext.algorithms import LocalTerm


class FederatedBundleAlgo(MonaiAlgo):
    """``MonaiAlgo`` for a bundle of ``bundles/`` with per-site overrides and FL hooks.

    Args:
        bundle_root: bundle folder (absolute, or relative to the FL app root).
        overrides: bundle config overrides for this site (``dataset_dir``, ``datalist``, ``ckpt_dir``,
            ``output_dir``...), applied to training and evaluation alike.
        local_epochs: local epochs per round.
        local_term: the algorithm's client-side term (default: FedAvg, none).
        **kwargs: passed to ``MonaiAlgo``.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
        local_epochs: int = 1,
        local_term: LocalTerm | None = None,
        **kwargs: Any,
    ) -> None:
        overrides = dict(overrides or {})
        ckpt_dir = overrides.get("ckpt_dir")
        if ckpt_dir:  # MonaiAlgo joins these to bundle_root; an absolute path wins in os.path.join
            kwargs.setdefault("best_model_filepath", str(Path(ckpt_dir) / "model.pt"))
            kwargs.setdefault("final_model_filepath", str(Path(ckpt_dir) / "model_final.pt"))
        super().__init__(
            bundle_root=str(bundle_root),
            local_epochs=local_epochs,
            send_weight_diff=True,
            train_kwargs=dict(overrides),
            eval_kwargs=dict(overrides),
            **kwargs,
        )
        self.local_term = local_term or LocalTerm()
        self.round_meta: dict[str, Any] = {}

    def initialize(self, extra: dict | None = None) -> None:
        """Build the bundle's workflows (MONAI's keys: ``ExtraItems.CLIENT_NAME``, ``ExtraItems.APP_ROOT``), then the hooks."""
        super().initialize(extra)
        self.configure_training()
        self.local_term.attach(self.trainer)

    def configure_training(self) -> None:
        """Hook: change how the trainer trains (DP-SGD replaces network, optimizer and data loader here)."""

    def train(self, data: ExchangeObject, extra: dict | None = None) -> None:
        """One round of local training from the global weights in ``data``; ``extra["meta"]`` is the server's task meta."""
        meta = (extra or {}).get("meta", {})
        self.local_term.start_round({k: torch.as_tensor(v) for k, v in data.weights.items()}, meta)
        super().train(data, extra)
        self.round_meta = self.local_term.end_round()

    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        """MONAI's weight diff and statistics, then :meth:`protect_update` (for the current-weights case)."""
        out = super().get_weights(extra)
        if out.weight_type is not None and ExtraItems.MODEL_TYPE not in (extra or {}):
            out = self.protect_update(out)
        return out

    def protect_update(self, update: ExchangeObject) -> ExchangeObject:
        """Hook: transform the outgoing update (privacy noise, secure masking). Default: unchanged."""
        return update

    def local_validation_metrics(self) -> dict[str, Any]:
        """Metrics of the site's local model on its validation data, from the trainer's last validation."""
        evaluator = getattr(self.train_workflow, "evaluator", None)
        return dict(evaluator.state.metrics) if evaluator is not None and evaluator.state is not None else {}

    def executed_iterations(self, update: ExchangeObject) -> int:
        """Local iterations of the round (FLARE weights each site's contribution by it)."""
        return int(update.statistics.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 0))
