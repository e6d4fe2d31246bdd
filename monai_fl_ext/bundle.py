"""Run a bundle of ``bundles/`` programmatically: resolve it, point it at data, train, predict.

Every run writes its checkpoints and logs under a run folder of its own (``ckpt_dir`` and
``output_dir`` overrides), never into the bundle, so one bundle serves many runs and sites.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_fl_ext.errors import InputError
from monai_fl_ext.metrics import split_metrics

TRAIN_CONFIG = "configs/train.json"
METADATA = "configs/metadata.json"
LOGGING_CONF = "configs/logging.conf"
REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def resolve_bundle(name_or_path: str | os.PathLike) -> Path:
    """Find a bundle folder by path, or by name under ``./bundles`` or this repository's ``bundles/``.

    Raises:
        InputError: no folder with ``configs/train.json`` is found.
    """
    candidates = [Path(name_or_path), Path("bundles") / str(name_or_path), REPO_BUNDLES / str(name_or_path)]
    for c in candidates:
        if (c / TRAIN_CONFIG).is_file():
            return c.resolve()
    raise InputError(f"bundle '{name_or_path}' not found (looked for {TRAIN_CONFIG} in {', '.join(map(str, candidates))})")


def run_overrides(
    bundle_root: Path, dataset_dir: str | os.PathLike, datalist: str | os.PathLike, run_dir: str | os.PathLike, **extra: Any
) -> dict[str, Any]:
    """Overrides that point a bundle at a dataset and a datalist and keep its outputs in ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    return {
        "bundle_root": str(bundle_root),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "datalist": str(Path(datalist).resolve()),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "eval"),
        **extra,
    }


def train_bundle(bundle_root: Path, overrides: Mapping[str, Any], progress: bool = True, verbose: bool = False) -> Any:
    """Train a bundle with MONAI's ``ConfigWorkflow``, exactly as ``monai.bundle run`` would.

    Args:
        bundle_root: bundle folder.
        overrides: config overrides (see :func:`run_overrides`), e.g. ``{"train#trainer#max_epochs": 5}``.
        progress: attach a progress bar over iterations.
        verbose: apply the bundle's ``logging.conf`` (per-iteration logs); otherwise the caller's logging stays.

    Returns:
        The finished ``ConfigWorkflow`` (its trainer and evaluator hold the final state); its
        ``validation_history`` lists the scalar validation metrics of every epoch.

    Raises:
        InputError: the bundle misses properties MONAI's train workflow requires.
    """
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle_root / TRAIN_CONFIG),
        meta_file=str(bundle_root / METADATA),
        logging_file=str(bundle_root / LOGGING_CONF) if verbose else False,
        workflow_type="train",
        **dict(overrides),
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise InputError(f"bundle {bundle_root}: missing required properties {missing}")
    history: list[dict[str, Any]] = []
    if workflow.evaluator is not None:  # per-epoch validation metrics, for convergence plots
        from ignite.engine import Events

        workflow.evaluator.add_event_handler(
            Events.EPOCH_COMPLETED,
            lambda e: history.append({"epoch": int(workflow.trainer.state.epoch), **split_metrics(e.state.metrics)[0]}),
        )
    workflow.validation_history = history
    if progress:
        from ignite.handlers import ProgressBar

        ProgressBar(desc="train", persist=False).attach(workflow.trainer, output_transform=_loss_of)
    workflow.run()
    workflow.finalize()
    return workflow


def _loss_of(output: Any) -> dict[str, Any]:
    """The loss of a trainer iteration's output: a decollated list, or one dict (DP-SGD's empty-batch step)."""
    item = output[0] if isinstance(output, list) and output else output
    return {"loss": item.get("loss")} if isinstance(item, dict) else {}


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """A plain or ``{"model": ...}`` checkpoint's state dict (``weights_only``), without Opacus' ``_module.`` prefix.

    Raises:
        InputError: the file is missing or not a torch checkpoint of tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise InputError(f"{path}: model file not found") from e
    except Exception as e:  # torch raises several types for a bad file
        raise InputError(f"{path}: not a loadable torch checkpoint ({e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("_module."): v for k, v in state.items()}


def check_state_matches(state: Mapping[str, Any], network: torch.nn.Module, where: str) -> None:
    """Raise unless ``state`` has exactly ``network``'s state-dict keys and shapes.

    Raises:
        InputError: naming ``where`` and the missing, unexpected or mis-shaped keys (a few of each).
    """
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(getattr(state[k], "shape", ())) != expected[k])
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label} {keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                           for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)) if keys)
        raise InputError(f"{where} does not fit the bundle's network (check norm/width overrides): {detail}")


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a plain or ``{"model": state_dict}`` checkpoint into ``network``, ignoring Opacus' ``_module.`` prefix."""
    network.load_state_dict(load_state(path))
    return network


@torch.no_grad()
def predict(
    bundle_root: Path, checkpoint: str | os.PathLike, overrides: Mapping[str, Any], split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of a checkpoint on one split of the datalist, with the bundle's own transforms.

    Args:
        bundle_root: bundle folder.
        checkpoint: model state dict file.
        overrides: as for :func:`train_bundle` (``dataset_dir``, ``datalist``...).
        split: datalist key to evaluate (``training``, ``validation`` or ``test``).

    Returns:
        ``(probs, labels)``, both (N, K) arrays.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_root / TRAIN_CONFIG))
    parser.update({**overrides, "validate#datalist_key": split, "device": "$torch.device('cpu')"})
    network = load_checkpoint(parser.get_parsed_content("network_def"), checkpoint).eval()
    probs, labels = [], []
    for batch in parser.get_parsed_content("validate#dataloader"):
        probs.append(torch.sigmoid(network(batch["image"])))
        labels.append(batch["label"])
    if not probs:
        raise InputError(f"datalist {overrides.get('datalist')}: split '{split}' is empty")
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()
