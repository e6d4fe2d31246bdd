"""DP-SGD (Abadi et al. 2016) for a MONAI ``SupervisedTrainer``, built from Opacus' own pieces, bundle unchanged.

Why not ``clip_grad_norm_`` plus noise?
    DP-SGD bounds what any *one* training example (here: one patient's image) can contribute to an
    update: every example's gradient is clipped to norm ``max_grad_norm`` *before* the gradients are
    summed, and Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to the
    sum. The sensitivity of the sum to adding or removing one example is then ``max_grad_norm``, which
    the noise is calibrated to. Clipping the *batch* gradient (``torch.nn.utils.clip_grad_norm_``) bounds
    the norm of the average, not any one patient's share of it: a single outlier image can still
    dominate the direction of the update (the others' contributions shrink along with it), so the
    noise is not calibrated to any per-patient sensitivity and no (epsilon, delta) guarantee follows.
    Per-example gradients are what Opacus' ``GradSampleModule`` computes and ``DPOptimizer`` clips.

How this plugs into MONAI (each point verified by the tests in ``tests/test_dp_sgd.py``):

- **Network, plain keys.** ``opacus.GradSampleModule`` (hooks mode) is built around
  ``trainer.network``, but ``trainer.network`` stays the original ``nn.Module``. The per-sample
  hooks are forward hooks and full backward hooks registered *on the original submodules*, so the
  trainer calling its own network records activations and fills ``p.grad_sample``. The wrapper is
  kept in :class:`DPTrainingState` (and the hooks reference it), never handed to MONAI, so
  ``state_dict()`` keys stay plain (no ``_module.`` prefix): ``MonaiAlgo``'s weight exchange,
  ``CheckpointSaver`` and the evaluator work unchanged. The hooks record nothing in eval mode or
  under ``no_grad``, so the shared evaluator is unaffected.
- **Optimizer.** ``trainer.optimizer`` becomes ``opacus.optimizers.DPOptimizer`` around the bundle's
  optimizer (``loss_reduction="mean"``, ``expected_batch_size`` = the bundle's batch size): per-sample
  clipping, Gaussian noise, division by the *expected* batch size. Param groups and state are the
  wrapped optimizer's, so learning-rate handlers and SCAFFOLD's ``get_lr_values`` still work.
- **Data.** ``trainer.data_loader`` becomes a loader over the same dataset with Opacus'
  ``UniformWithReplacementSampler`` as batch sampler (Poisson sampling, rate
  ``q = batch_size / len(dataset)``, ``int(1/q)`` batches per epoch, Opacus' convention) and the
  bundle's own collate function. MONAI's ``Workflow.run`` passes ``self.data_loader`` to ignite's
  ``Engine.run`` on every call, and ignite takes it up whenever no epoch is in progress, so
  replacing the attribute is enough (no ``set_data``); ``state.epoch_length`` is updated to the new
  loader's length. ``MonaiAlgo``'s continued runs (``max_epochs`` raised each round) keep the
  replaced loader and optimizer.
- **Empty batches.** Poisson sampling can select no sample at all (probability ``(1-q)^N``). The
  batch still has to be a DP-SGD step (the accountant counts it): Opacus turns it into a noise-only
  step. MONAI's ResNet cannot run on a zero-length batch (``x.view(0, -1)``), and
  Opacus' ``DPDataLoader`` collate cannot make an empty MONAI batch (string lists such as
  ``patient`` raise ``TypeError``). So: the collate function returns the structure of a real batch
  with zero-length tensors and empty lists, and the trainer's iteration function is wrapped: on an
  empty batch it skips forward and backward, gives every parameter a zero-length ``grad_sample``
  and calls ``DPOptimizer.step()``, which clips nothing, adds the same noise as Opacus would and
  divides by the expected batch size: exactly Opacus' noise-only step. The iteration is a normal
  ignite iteration (``ITERATION_COMPLETED`` fires, it is counted in ``steps_taken`` and in
  ``MonaiAlgo``'s executed iterations); its output stays an undecollated dict
  ``{"image": zero-length tensor, "label": [], "pred": [], "loss": nan}``: MONAI's ``from_engine``
  cannot read an empty decollated list and MONAI's cumulative metrics reject zero-length tensors,
  but ``from_engine(["pred", "label"])`` of this dict is ``([], [])``, which ignite's ``Metric``
  unrolls into no update at all; loss loggers (``StatsHandler``, ``TensorBoardStatsHandler``) skip
  the step with a "non-scalar output" warning. IterationEvents (``FORWARD_COMPLETED``...,
  ``MODEL_COMPLETED``: decollation, postprocessing) are not fired for it: there was no forward pass.
- **Loss.** ``BCEWithLogitsLoss`` with ``reduction="mean"`` averages over batch *and* labels. In hooks
  mode Opacus rescales the backpropagated gradient by the batch size, so each per-sample gradient is
  the gradient of that image's mean BCE over the 14 labels: a proper per-sample loss, clipped as a
  whole. (Ghost clipping would need a per-sample loss vector; hooks mode does not.)
- **Refusals.** Networks Opacus cannot train privately (``opacus.validators.ModuleValidator``:
  BatchNorm mixes samples and keeps running statistics) raise ``ValueError`` naming the bundle
  override ``norm=group``; so do AMP (the gradient scaler would scale per-sample gradients before
  clipping) and gradient accumulation (Poisson sampling requires one optimizer step per sampled batch).
- **Not covered.** ``DPOptimizer`` replaces ``p.grad`` by the noisy sum of the clipped per-sample
  gradients, which only the module hooks produce. A loss term computed from the parameters
  themselves (FedProx's proximal term) therefore has no effect under DP-SGD. Its gradient depends
  on no private data, so it can be added to ``p.grad`` after noising (e.g. in a ``DPOptimizer`` step
  hook) without changing the guarantee; this module does not do it.

Randomness: with ``seed=None`` both the noise and the Poisson sampling use generators seeded from OS
entropy, *not* torch's global generator (the bundle seeds that with a public ``set_determinism``
seed; noise an adversary can regenerate gives no privacy). Pass ``seed`` only for tests and
reproducible experiments. Opacus' ``secure_mode`` (a CSPRNG) is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["GRAD_SAMPLE_MODES", "DPTrainingState", "enable_dp_sgd", "validate_network"]

GRAD_SAMPLE_MODES = ("hooks", "mixed_ghost")


class DPTrainingState:
    """What :func:`enable_dp_sgd` set up, and the DP-SGD steps taken since the last reset.

    Attributes:
        sample_rate: Poisson sampling rate ``q = batch_size / len(dataset)`` (the accountant's ``q``).
        noise_multiplier: noise standard deviation over ``max_grad_norm`` (the accountant's ``sigma``);
            reads and writes the ``DPOptimizer``'s own value, so what is accounted is what is applied.
        max_grad_norm: per-sample clipping norm (likewise the optimizer's).
        steps_taken: DP-SGD optimizer steps since the last :meth:`reset_step_count`, noise-only steps
            on empty batches included (counted at ignite's ``ITERATION_COMPLETED``).
        empty_steps: how many of those were noise-only steps on empty batches.
        expected_batch_size: the divisor of the noisy gradient sum (``loss_reduction="mean"``).
        dataset_size: number of training samples.
        poisson: whether batches are Poisson-sampled (what RDP/PRV accounting assumes).
        grad_sample_module: Opacus' ``GradSampleModule``; its hooks live on ``trainer.network``.
        optimizer: the ``DPOptimizer`` now at ``trainer.optimizer``.
        data_loader: the loader now at ``trainer.data_loader``.
    """

    def __init__(self, *, sample_rate: float, expected_batch_size: int, dataset_size: int, poisson: bool,
                 grad_sample_module: Any, optimizer: Any, data_loader: Any) -> None:
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.dataset_size = dataset_size
        self.poisson = poisson
        self.grad_sample_module = grad_sample_module
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.steps_taken = 0
        self.empty_steps = 0
        self.grad_sample_mode = "hooks"

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"noise_multiplier must be >= 0, got {value}")
        self.optimizer.noise_multiplier = float(value)

    @property
    def max_grad_norm(self) -> float:
        return float(self.optimizer.max_grad_norm)

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {value}")
        self.optimizer.max_grad_norm = float(value)

    def reset_step_count(self) -> None:
        """Start counting steps afresh (e.g. at the start of a federated round)."""
        self.steps_taken = 0
        self.empty_steps = 0

    def __repr__(self) -> str:
        return (f"DPTrainingState(sample_rate={self.sample_rate:.6g}, noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm}, expected_batch_size={self.expected_batch_size}, "
                f"dataset_size={self.dataset_size}, poisson={self.poisson}, steps_taken={self.steps_taken}, "
                f"empty_steps={self.empty_steps})")


def validate_network(network: torch.nn.Module) -> None:
    """Refuse a network Opacus cannot train with per-sample gradients.

    Raises:
        ValueError: Opacus' ``ModuleValidator`` reports errors (e.g. BatchNorm); the message names
            the bundle override ``norm=group``.
    """
    from opacus.validators import ModuleValidator

    was_training = network.training
    network.train()  # the validator also complains about eval mode, which is not a property of the model
    try:
        errors = ModuleValidator.validate(network, strict=False)
        offending = [(name, type(m).__name__) for name, m in network.named_modules()
                     if type(m) in ModuleValidator.VALIDATORS and ModuleValidator.VALIDATORS[type(m)](m)]
    finally:
        network.train(was_training)
    if errors:
        reasons = list(dict.fromkeys(str(e).split(". ")[0] for e in errors))  # first sentence of each distinct error
        types = sorted({t for _, t in offending})
        names = ", ".join(n or "<root>" for n, _ in offending[:3]) + (", ..." if len(offending) > 3 else "")
        raise ValueError(
            f"DP-SGD (Opacus) cannot train this network: {len(errors)} unsupported module(s)"
            f"{' (' + ', '.join(types) + ': ' + names + ')' if offending else ''}: {'; '.join(reasons)}. "
            "BatchNorm mixes the samples of a batch, so per-sample gradients do not exist; build the bundle with "
            "GroupNorm instead: set the bundle override norm=group (e.g. --norm group, or overrides {'norm': 'group'})."
        )


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic seed from the OS, not torch's (publicly seeded) global generator
    else:
        gen.manual_seed(int(seed))
    return gen


def _batch_len(batch: Any) -> int | None:
    """Number of samples in a collated batch (the first tensor's leading dimension), or None if unknown."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for v in values:
        if torch.is_tensor(v) or isinstance(v, (Mapping, list, tuple)):
            n = _batch_len(v)
            if n is not None:
                return n
    return None


def _empty_like(batch: Any) -> Any:
    """The structure of a collated batch with no samples: zero-length tensors, empty lists; nothing of the data."""
    if torch.is_tensor(batch):
        return torch.empty((0, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    if isinstance(batch, Mapping):
        return {k: _empty_like(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return []
    return None


class EmptySafeCollate:
    """The bundle's collate function, plus an empty batch (same keys, no samples) for an empty index list.

    The empty structure is learnt from the first non-empty batch (as Opacus' ``CollateFnWithEmpty``
    does), or, if the very first batch is empty, from collating ``dataset[0]`` and dropping its data.
    Unlike Opacus' version it accepts MONAI's non-tensor batch entries (lists of strings).
    """

    def __init__(self, collate_fn: Callable, dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self.template: Any = None

    def __call__(self, items: list) -> Any:
        if len(items) > 0:
            batch = self.collate_fn(items)
            if self.template is None:
                self.template = _empty_like(batch)
            return batch
        if self.template is None:
            self.template = _empty_like(self.collate_fn([self.dataset[0]]))
        return _empty_like(self.template)


def _poisson_loader(loader: DataLoader, sample_rate: float, generator: torch.Generator) -> DataLoader:
    """A loader over ``loader.dataset`` with Opacus' Poisson batch sampler and an empty-safe collate."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    kwargs: dict[str, Any] = {}
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return DataLoader(
        loader.dataset,
        batch_sampler=UniformWithReplacementSampler(num_samples=len(loader.dataset), sample_rate=sample_rate, generator=generator),
        collate_fn=EmptySafeCollate(loader.collate_fn, loader.dataset),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        **kwargs,
    )


def _wrap_iteration(trainer: Any, state: DPTrainingState) -> None:
    """Run a noise-only DP-SGD step instead of forward/backward when the sampled batch is empty."""
    from monai.utils import CommonKeys as Keys

    process = trainer._process_function  # ignite's Engine keeps the iteration function here; MONAI's is trainer._iteration

    def iteration(engine: Any, batchdata: Any) -> Any:
        if _batch_len(batchdata) != 0:
            return process(engine, batchdata)
        optimizer = engine.optimizer
        engine.network.train()
        optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", False))
        for p in optimizer.params:  # what Opacus' hooks produce for a zero-length batch
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()  # DPOptimizer: clip (nothing) + noise, / expected_batch_size, then the bundle's step
        state.empty_steps += 1
        # Not decollated (MONAI's from_engine cannot read an empty list): from_engine(["pred", "label"]) gives
        # ([], []), which ignite unrolls into no metric update; loss loggers skip the 1-tuple (nan,) with a warning.
        image = batchdata.get(Keys.IMAGE) if isinstance(batchdata, Mapping) else None
        return {Keys.IMAGE: image, Keys.LABEL: [], Keys.PRED: [], Keys.LOSS: torch.tensor(float("nan"))}

    trainer._process_function = iteration


def enable_dp_sgd(
    trainer: Any,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson: bool = True,
    seed: int | None = None,
    *,
    sample_rate: float | None = None,
    grad_sample_mode: str = "hooks",
) -> DPTrainingState:
    """Make a MONAI ``SupervisedTrainer`` train with Opacus DP-SGD; ``trainer.network`` keeps its plain keys.

    Call it once, after the trainer is built and before it runs (for ``MonaiAlgo``: in
    ``FederatedBundleAlgo.configure_training``). See the module docstring for the design.

    Args:
        trainer: a ``monai.engines.SupervisedTrainer`` (``network``, ``optimizer``, ``data_loader``).
        noise_multiplier: Gaussian noise std over ``max_grad_norm``; 0 disables noise (clipping only, no privacy).
        max_grad_norm: per-sample gradient clipping norm.
        poisson: Poisson sampling (each sample joins each batch with probability ``sample_rate``), which
            the privacy accountants assume; ``False`` keeps the bundle's shuffled fixed-size batches.
        seed: seeds the noise and the sampling (tests only); ``None``: OS entropy.
        sample_rate: override ``q`` (default ``batch_size / len(dataset)``); an epoch is ``int(1/q)`` steps.
        grad_sample_mode: ``"hooks"`` (default): Opacus' per-sample gradients for every parameter;
            ``"mixed_ghost"``: the same DP-SGD step (same clipped sum, noise and accounting) without per-sample
            gradients for 2D convolution weights (their per-sample norms by the cheaper of the ghost and the
            direct form, the clipped sum by book-keeping; :mod:`monai_fl_ext.privacy.ghost`), faster and
            smaller on CNNs.

    Returns:
        The :class:`DPTrainingState`; keep it (it holds the ``GradSampleModule``) and read
        ``sample_rate``, ``noise_multiplier`` and ``steps_taken`` for privacy accounting.

    Raises:
        ValueError: the network is not trainable by Opacus (BatchNorm: use ``norm=group``), the
            trainer uses AMP or gradient accumulation, DP-SGD is already enabled, or an argument is out of range.
        TypeError: the network is already a ``GradSampleModule`` or the loader is not a torch ``DataLoader``.
    """
    from ignite.engine import Events
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if getattr(trainer, "_dp_sgd_state", None) is not None:
        raise ValueError("DP-SGD is already enabled on this trainer")
    if getattr(trainer, "amp", False):
        raise ValueError("DP-SGD does not support AMP (the gradient scaler would scale per-sample gradients before clipping); set amp=false")
    if getattr(trainer, "accumulation_steps", 1) != 1:
        raise ValueError("DP-SGD needs one optimizer step per sampled batch; set accumulation_steps=1")
    network, loader = trainer.network, trainer.data_loader
    if isinstance(network, GradSampleModule):
        raise TypeError("trainer.network is already a GradSampleModule; pass the plain network")
    validate_network(network)
    if not isinstance(loader, DataLoader):
        raise TypeError(f"DP-SGD needs trainer.data_loader to be a torch DataLoader, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError("DP-SGD needs trainer.data_loader to have a batch_size (not a custom batch_sampler)")
    dataset_size, batch_size = len(loader.dataset), int(loader.batch_size)
    q = float(sample_rate) if sample_rate is not None else min(1.0, batch_size / dataset_size)
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")
    expected_batch_size = max(1, round(q * dataset_size)) if poisson else batch_size

    seeds = [None, None] if seed is None else [int(s) for s in np.random.SeedSequence(seed).generate_state(2)]
    device = next(network.parameters()).device
    if grad_sample_mode == "mixed_ghost":
        from monai_fl_ext.privacy.ghost import make_grad_sample_module, make_optimizer

        grad_sample_module = make_grad_sample_module(network, batch_first=True, loss_reduction="mean", strict=True)
        optimizer_class: Callable[..., Any] = make_optimizer
    else:
        grad_sample_module = GradSampleModule(network, batch_first=True, loss_reduction="mean", strict=True)
        optimizer_class = DPOptimizer
    optimizer = optimizer_class(
        trainer.optimizer,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=_generator(seeds[0], device),
    )
    if poisson:
        grad_sample_module.forbid_grad_accumulation()
        new_loader = _poisson_loader(loader, q, _generator(seeds[1]))
    else:
        new_loader = loader
    state = DPTrainingState(
        sample_rate=q, expected_batch_size=expected_batch_size, dataset_size=dataset_size, poisson=poisson,
        grad_sample_module=grad_sample_module, optimizer=optimizer, data_loader=new_loader,
    )

    state.grad_sample_mode = grad_sample_mode
    trainer.optimizer = optimizer
    if new_loader is not loader:
        if trainer.state.epoch_length in (None, len(loader)):  # keep an epoch_length the bundle chose itself
            trainer.state.epoch_length = len(new_loader)
        trainer.data_loader = new_loader  # Workflow.run passes it to Engine.run on every call
        if getattr(trainer, "_dataloader_iter", None) is None:
            trainer.state.dataloader = new_loader
    _wrap_iteration(trainer, state)

    def count_step(engine: Any) -> None:
        state.steps_taken += 1

    trainer.add_event_handler(Events.ITERATION_COMPLETED, count_step)
    trainer._dp_sgd_state = state
    return state
