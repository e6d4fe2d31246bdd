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
from monai_fl_ext.privacy import DPSettings, PersistentAccountant, noise_for_target

PRIVACY = "privacy"  # round meta key of the site's privacy report


class FederatedBundleAlgo(MonaiAlgo):
    """``MonaiAlgo`` for a bundle of ``bundles/`` with per-site overrides and FL hooks.

    Args:
        bundle_root: bundle folder (absolute, or relative to the FL app root).
        overrides: bundle config overrides for this site (``dataset_dir``, ``datalist``, ``ckpt_dir``,
            ``output_dir``...), applied to training and evaluation alike.
        local_epochs: local epochs per round.
        local_term: the algorithm's client-side term (default: FedAvg, none).
        privacy: DP-SGD settings (Opacus, sample-level DP at this site); None trains without DP.
        privacy_state: file of this site's accountant; it persists across rounds and restarts.
        **kwargs: passed to ``MonaiAlgo``.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
        local_epochs: int = 1,
        local_term: LocalTerm | None = None,
        privacy: DPSettings | None = None,
        privacy_state: str | os.PathLike | None = None,
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
        self.privacy = privacy
        self.privacy_state = Path(privacy_state) if privacy_state else Path(ckpt_dir or ".") / "privacy_accountant.json"
        self.dp = None
        self.accountant: PersistentAccountant | None = None

    def initialize(self, extra: dict | None = None) -> None:
        """Build the bundle's workflows (MONAI's keys: ``ExtraItems.CLIENT_NAME``, ``ExtraItems.APP_ROOT``), then the hooks."""
        super().initialize(extra)
        self.configure_training()
        self.local_term.attach(self.trainer)

    def configure_training(self) -> None:
        """Hook: change how the trainer trains. With ``privacy``: Opacus DP-SGD (optimizer and Poisson loader
        replaced, per-sample hooks on the network, which keeps its plain state-dict keys) and the site's accountant.

        Raises:
            InputError: a DP setting is invalid for this site's data (e.g. delta >= 1/N).
            ValueError: the network cannot be trained by Opacus (set the bundle override ``norm=group``).
        """
        if self.privacy is None:
            return
        from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

        self.privacy.validate(len(self.train_workflow.train_dataset), where=str(self.client_name))
        self.dp = enable_dp_sgd(self.trainer, noise_multiplier=self.privacy.noise_multiplier or 1.0,
                                max_grad_norm=self.privacy.max_grad_norm, grad_sample_mode=self.privacy.grad_sample_mode)
        self.accountant = PersistentAccountant(self.privacy_state, accountant=self.privacy.accountant, delta=self.privacy.delta)
        self._calibrated = False

    def round_steps(self) -> int:
        """DP-SGD steps one round takes: local epochs times the Poisson loader's batches per epoch."""
        return self.local_epochs * len(self.dp.data_loader)

    def _calibrate(self, total_rounds: int) -> None:
        """Noise multiplier: given, or derived from the target epsilon over the whole planned run."""
        sigma = self.privacy.noise_multiplier
        if sigma is None:
            sigma = noise_for_target(self.privacy.target_epsilon, self.privacy.delta, self.dp.sample_rate,
                                     total_rounds * self.round_steps(), self.privacy.accountant)
        self.dp.noise_multiplier = self.dp.optimizer.noise_multiplier = float(sigma)
        self._calibrated = True

    def train(self, data: ExchangeObject, extra: dict | None = None) -> None:
        """One round of local training from the global weights in ``data``; ``extra["meta"]`` is the server's task meta.

        Raises:
            BudgetExceeded: with DP, the round would take this site past its privacy budget (nothing is trained).
        """
        meta = (extra or {}).get("meta", {})
        if self.dp is not None:
            if not self._calibrated:
                self._calibrate(int(meta.get("total_rounds") or 1))
            where = f"{self.client_name}, round {meta.get('current_round', '?')}"
            self.accountant.check_budget(self.privacy.budget_epsilon, self.privacy.delta, self.dp.noise_multiplier,
                                         self.dp.sample_rate, self.round_steps(), where=where)
            self.dp.reset_step_count()
        self.local_term.start_round({k: torch.as_tensor(v) for k, v in data.weights.items()}, meta)
        super().train(data, extra)
        self.round_meta = self.local_term.end_round()
        if self.dp is not None:
            self.accountant.record(self.dp.noise_multiplier, self.dp.sample_rate, self.dp.steps_taken)
            self.round_meta[PRIVACY] = self.privacy_report()

    def privacy_report(self) -> dict[str, Any]:
        """Cumulative (epsilon, delta) of this site and the settings that produced it."""
        return {
            "epsilon": self.accountant.epsilon(self.privacy.delta),
            "delta": self.privacy.delta,
            "sample_rate": self.dp.sample_rate,
            "noise_multiplier": self.dp.noise_multiplier,
            "max_grad_norm": self.dp.max_grad_norm,
            "steps": self.accountant.steps,
            "budget_epsilon": self.privacy.budget_epsilon,
            "accountant": self.privacy.accountant,
            "grad_sample_mode": self.privacy.grad_sample_mode,
        }

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
