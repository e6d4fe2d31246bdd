"""Federated algorithm pieces that are not FLARE's own: client-side local terms wired into MONAI's
ignite trainer, and the server-side rules for SCAFFOLD controls and FedOpt.

Client terms reuse FLARE's implementations (``PTFedProxLoss``, ``PTScaffoldHelper``); this module
only connects them to a ``SupervisedTrainer``, which has no place for them on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.networks.utils import copy_model_state

from monai_fl_ext.robust import is_float, update_norm

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedopt")
FEDPROX_MU = "fedprox_mu"  # FLARE's meta keys (nvflare.app_common.app_constant.AlgorithmConstants)
SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"
SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"


def frozen_copy(network: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A detached copy of ``network`` holding ``weights`` (the round's global model)."""
    clone = copy.deepcopy(network)
    copy_model_state(src=dict(weights), dst=clone)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class LocalTerm:
    """What an algorithm adds to local training. The base class is FedAvg: nothing.

    ``attach`` is called once after the ClientAlgo is initialised, ``start_round`` before and
    ``end_round`` after each round's local training; ``end_round`` returns meta for the server.
    """

    name = "fedavg"

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def start_round(self, global_weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        pass

    def end_round(self) -> dict[str, Any]:
        return {}


class _ProxLoss(torch.nn.Module):
    """Base loss plus FLARE's proximal term mu/2 ||w - w_global||^2."""

    def __init__(self, base: torch.nn.Module, network: torch.nn.Module, mu: float) -> None:
        super().__init__()
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        self.base, self.prox = base, PTFedProxLoss(mu=mu)
        self.network = [network]  # a list keeps it out of this module's parameters
        self.global_network: torch.nn.Module | None = None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(pred, target)
        if self.global_network is not None and self.prox.mu > 0:
            loss = loss + self.prox(self.network[0], self.global_network)
        return loss


class FedProxTerm(LocalTerm):
    """FedProx (Li et al. 2020): the trainer's loss gains FLARE's ``PTFedProxLoss`` towards the round's global model.

    Args:
        mu: proximal weight; the server's ``fedprox_mu`` meta, when sent, overrides it.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"fedprox mu must be >= 0, got {mu}")
        self.mu = mu

    def attach(self, trainer: Any) -> None:
        super().attach(trainer)
        self.loss = _ProxLoss(trainer.loss_function, trainer.network, self.mu)
        if hasattr(trainer.optimizer, "noise_multiplier"):
            # DP-SGD replaces the gradient by the noisy sum of clipped per-sample gradients, which drops any
            # loss term of the weights alone; the proximal step is taken after the optimizer instead. It uses
            # no patient data, so it is post-processing and costs no privacy.
            from ignite.engine import Events

            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._proximal_step)
        else:
            trainer.loss_function = self.loss

    @torch.no_grad()
    def _proximal_step(self, engine: Any) -> None:
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        mu = self.loss.prox.mu
        for p, g in zip(self.trainer.network.parameters(), self.loss.global_network.parameters()):
            if p.requires_grad:
                p.sub_(lr * mu * (p - g))

    def start_round(self, global_weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.loss.prox.mu = float(meta.get(FEDPROX_MU, self.mu))
        self.loss.global_network = frozen_copy(self.trainer.network, global_weights)


class ScaffoldTerm(LocalTerm):
    """SCAFFOLD (Karimireddy et al. 2020) with FLARE's ``PTScaffoldHelper``; the site's control variate persists across rounds."""

    name = "scaffold"

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        super().attach(trainer)
        self.helper = PTScaffoldHelper()
        self.helper.init(trainer.network)
        self._global_network: torch.nn.Module | None = None
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._correct)

    def _lr(self) -> float:
        from nvflare.app_opt.pt.scaffold import get_lr_values

        return get_lr_values(self.trainer.optimizer)[0]

    def _correct(self, engine: Any) -> None:
        self.helper.model_update(self.trainer.network, self._lr(), *self._controls)

    def start_round(self, global_weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if SCAFFOLD_CTRL_GLOBAL in meta:
            self.helper.load_global_controls({k: torch.as_tensor(np.asarray(v)) for k, v in meta[SCAFFOLD_CTRL_GLOBAL].items()})
        self._global_network = frozen_copy(self.trainer.network, global_weights)
        self._controls = self.helper.get_params()  # also resets the helper's step count: once per round

    def end_round(self) -> dict[str, Any]:
        self.helper.terms_update(self.trainer.network, self._lr(), *self._controls, self._global_network)
        return {SCAFFOLD_CTRL_DIFF: {k: np.asarray(v) for k, v in self.helper.get_delta_controls().items()}}


def make_local_term(algorithm: str, fedprox_mu: float = 0.01) -> LocalTerm:
    """The client-side term of ``algorithm`` (FedOpt and FedAvg train plainly; FedOpt is a server rule).

    Raises:
        ValueError: unknown algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "fedprox":
        return FedProxTerm(fedprox_mu)
    if algorithm == "scaffold":
        return ScaffoldTerm()
    return LocalTerm()


def clip_update(update: Mapping[str, Any], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale a site's update so that the L2 norm of its floating-point entries is at most ``clip``.

    Returns:
        ``(clipped update, norm before clipping)``.
    """
    norm = update_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: np.asarray(v) * scale if is_float(v) else np.asarray(v) for k, v in update.items()}, norm


def dp_fedavg_mean(updates: list[Mapping[str, Any]], clip: float, noise_multiplier: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DP-FedAvg (McMahan et al. 2018): uniform mean of clipped site updates plus Gaussian noise of std
    ``noise_multiplier * clip / n`` on every floating-point entry (each site's influence is at most ``clip / n``).

    Weights are uniform on purpose: weighting by local sample counts would make the sensitivity data-dependent.

    Raises:
        ValueError: no updates, or ``clip`` not positive.
    """
    if not updates or clip <= 0:
        raise ValueError(f"DP-FedAvg needs updates and a positive clip norm, got {len(updates)} updates and clip={clip}")
    clipped = [clip_update(u, clip)[0] for u in updates]
    n = len(clipped)
    mean = {}
    for key in clipped[0]:
        total = sum(np.asarray(c[key], dtype=np.float64) for c in clipped) / n
        if is_float(clipped[0][key]):
            total = total + rng.normal(0.0, noise_multiplier * clip / n, size=np.shape(total))
        mean[key] = total.astype(np.asarray(clipped[0][key]).dtype)
    return mean


class ServerOptimizer:
    """FedOpt (Reddi et al. 2021): the weighted mean update is a pseudo-gradient for a torch optimizer on the server.

    Keys the optimizer does not own (buffers such as BatchNorm statistics) are averaged as in FedAvg.

    Args:
        name: ``"sgd"`` (FedAvgM with momentum) or ``"adam"`` (FedAdam).
        lr: server learning rate.
        momentum: SGD momentum.
    """

    def __init__(self, name: str = "sgd", lr: float = 1.0, momentum: float = 0.6) -> None:
        if name not in ("sgd", "adam"):
            raise ValueError(f"server optimizer must be 'sgd' or 'adam', got {name!r}")
        self.name, self.lr, self.momentum = name, lr, momentum
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def step(self, global_params: Mapping[str, np.ndarray], mean_update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global parameters from the current ones and the aggregated diff."""
        float_keys = [k for k, v in mean_update.items() if np.issubdtype(np.asarray(global_params[k]).dtype, np.floating)]
        if self.optimizer is None:
            self.params = {k: torch.nn.Parameter(torch.as_tensor(np.array(global_params[k], dtype=np.float32))) for k in float_keys}
            if self.name == "sgd":
                self.optimizer = torch.optim.SGD(self.params.values(), lr=self.lr, momentum=self.momentum)
            else:
                self.optimizer = torch.optim.Adam(self.params.values(), lr=self.lr)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.as_tensor(np.asarray(global_params[k], dtype=np.float32)))
                p.grad = -torch.as_tensor(np.asarray(mean_update[k], dtype=np.float32))
        self.optimizer.step()
        new = {k: np.asarray(global_params[k]) + np.asarray(v) for k, v in mean_update.items()}
        new.update({k: p.detach().numpy().copy() for k, p in self.params.items()})
        return new
