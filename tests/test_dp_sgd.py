"""Opacus DP-SGD inside the bundle's MONAI SupervisedTrainer: per-sample gradients, clipping, noise, Poisson batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import BUNDLE

BATCH = 12  # site-2 has 23 training images: q = 12/23, int(1/q) = 1 Poisson batch per epoch
SIZE = [16, 16]  # the tiny cohort's 32 px images, resized: the per-sample gradient hooks cost per pixel


def _workflow(tiny_cohort, tiny_overrides, tmp_path, norm="group", validate=False, **extra):
    from monai.bundle import ConfigWorkflow

    _, _, partition_dir = tiny_cohort
    configs = BUNDLE / "configs"
    overrides = {**tiny_overrides, "datalist": str(partition_dir / "site-2.json"), "batch_size": BATCH, "spatial_size": SIZE, "norm": norm,
                 "train#trainer#max_epochs": 1, "val_interval": 1 if validate else 1000, "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"),
                 **extra}
    workflow = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                              logging_file=False, workflow_type="train", bundle_root=str(BUNDLE), **overrides)
    workflow.initialize()
    return workflow


def _weights(network):
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _count_steps(state):
    """Count the wrapped (bundle) optimizer's real steps."""
    calls = []
    inner = state.optimizer.original_optimizer
    step = inner.step
    inner.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    return calls


def test_trainer_runs_dp_sgd_with_per_sample_gradients_and_keeps_plain_keys(tiny_cohort, tiny_overrides, tmp_path):
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    workflow = _workflow(tiny_cohort, tiny_overrides, tmp_path, validate=True)
    trainer = workflow.trainer
    network, keys = trainer.network, list(trainer.network.state_dict())
    start = _weights(network)
    state = enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)

    assert trainer.network is network and isinstance(trainer.optimizer, DPOptimizer)
    assert isinstance(trainer.data_loader.batch_sampler, UniformWithReplacementSampler)
    n = len(trainer.data_loader.dataset)
    assert state.sample_rate == pytest.approx(BATCH / n) and state.expected_batch_size == BATCH
    assert (state.noise_multiplier, state.max_grad_norm) == (1.0, 1.0)
    assert trainer.state.epoch_length == len(trainer.data_loader) == int(n / BATCH)

    per_sample = []  # at each DP step, before clipping: every trainable parameter has one gradient per sampled image

    def check(optimizer):
        sizes = {p.grad_sample.shape[0] if torch.is_tensor(p.grad_sample) else None for p in optimizer.params}
        per_sample.append((len(optimizer.params), sizes))

    state.optimizer.attach_step_hook(check)
    steps = _count_steps(state)
    batch_sizes = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: batch_sizes.append(len(e.state.batch["label"])))
    trainer.run()

    trainable = [p for p in network.parameters() if p.requires_grad]
    assert len(per_sample) == len(steps) == state.steps_taken == trainer.state.iteration == trainer.state.epoch_length
    assert all(count == len(trainable) and sizes == {b} for (count, sizes), b in zip(per_sample, batch_sizes))
    assert all(not torch.equal(start[k], v) for k, v in network.state_dict().items() if v.is_floating_point())
    assert list(network.state_dict()) == keys and not any(k.startswith("_module.") for k in keys)
    saved = torch.load(tmp_path / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    assert list(saved) == keys  # the bundle's CheckpointSaver still writes plain keys
    assert "val_auc" in workflow.evaluator.state.metrics  # the shared evaluator (eval mode, no_grad) is unaffected

    # MonaiAlgo continues the ignite state: raise max_epochs and run again, still on the Poisson loader
    trainer.state.max_epochs = trainer.state.epoch + 1
    trainer.run()
    assert state.steps_taken == len(steps) == trainer.state.iteration == 2 * trainer.state.epoch_length
    state.reset_step_count()
    assert state.steps_taken == 0 and state.empty_steps == 0
    state.noise_multiplier = 2.5  # what the accountant reads is what the optimizer applies
    assert trainer.optimizer.noise_multiplier == 2.5


def test_per_sample_clipping_bounds_each_images_contribution(tiny_cohort, tiny_overrides, tmp_path):
    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    lr, clip = 1e4, 1e-6  # SGD: the update is lr * (sum of clipped per-sample gradients) / expected batch size
    workflow = _workflow(tiny_cohort, tiny_overrides, tmp_path)
    trainer = workflow.trainer
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=lr)
    state = enable_dp_sgd(trainer, noise_multiplier=0.0, max_grad_norm=clip, poisson=False, seed=0)
    trainer.state.epoch_length = 1
    seen = {}

    def check(optimizer):  # after clipping and (zero) noise, before the SGD step
        gs = [p.grad_sample for p in optimizer.params]
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in gs], dim=1).norm(dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        expected = [torch.einsum("i,i...", factor, g) for g in gs]  # each image's gradient scaled to norm <= clip
        seen["batch"] = len(norms)
        seen["raw_norms"] = norms
        seen["summed_norm"] = float(torch.cat([p.summed_grad.flatten() for p in optimizer.params]).norm())
        seen["matches"] = all(torch.allclose(p.summed_grad, e, rtol=1e-4, atol=1e-12) for p, e in zip(optimizer.params, expected))

    state.optimizer.attach_step_hook(check)
    start = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()

    b = seen["batch"]
    assert b == BATCH and seen["matches"]
    assert float(seen["raw_norms"].min()) > 1e3 * clip  # every image's gradient was far above the clip...
    assert 0 < seen["summed_norm"] <= b * clip * (1 + 1e-4)  # ...and their clipped sum is bounded by B * C
    update = float(torch.cat([(p.detach() - s).flatten() for p, s in zip(trainer.network.parameters(), start)]).norm())
    assert 0 < update <= lr * b * clip / state.expected_batch_size * 1.01


def test_noise_depends_on_the_seed_and_nothing_else(tiny_cohort, tiny_overrides, tmp_path):
    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    start = None
    results = []
    for i, seed in enumerate((1, 2, 1)):
        trainer = _workflow(tiny_cohort, tiny_overrides, tmp_path / str(i)).trainer
        if start is None:
            start = _weights(trainer.network)
        trainer.network.load_state_dict(start)
        # fixed batches (same shuffled order from the bundle's seed): only the noise generator differs
        enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0, poisson=False, seed=seed)
        trainer.state.epoch_length = 1
        trainer.run()
        results.append(torch.cat([p.detach().flatten() for p in trainer.network.parameters()]))
    assert not torch.equal(results[0], results[1])  # different noise
    assert torch.equal(results[0], results[2])  # same seed, same everything


def test_without_a_seed_the_noise_cannot_be_regenerated_from_the_public_bundle_seed(tiny_cohort, tiny_overrides, tmp_path):
    """Federated DP runs pass no seed: the same bundle seed and torch seed must still give different noise."""
    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    start = None
    results = []
    for i in range(2):
        trainer = _workflow(tiny_cohort, tiny_overrides, tmp_path / str(i)).trainer
        if start is None:
            start = _weights(trainer.network)
        trainer.network.load_state_dict(start)
        torch.manual_seed(0)  # what an adversary who knows the bundle's set_determinism seed can reproduce
        enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0, poisson=False, seed=None)
        trainer.state.epoch_length = 1
        trainer.run()
        results.append(torch.cat([p.detach().flatten() for p in trainer.network.parameters()]))
    assert not torch.equal(results[0], results[1])


def test_poisson_batches_vary_and_empty_batches_are_noise_only_steps(tiny_cohort, tiny_overrides, tmp_path):
    from ignite.engine import Events

    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    workflow = _workflow(tiny_cohort, tiny_overrides, tmp_path)
    trainer = workflow.trainer
    # a forced tiny sample rate: with seed 6 the first Poisson batches hold 0, 0, 2 and 0 of the 23 images
    state = enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0, seed=6, sample_rate=0.02)
    trainer.state.epoch_length = 4
    steps = _count_steps(state)
    seen = []

    @trainer.on(Events.ITERATION_STARTED)
    def before(engine):  # the collated batch (MONAI decollates non-empty ones after the forward pass)
        batch = engine.state.batch
        seen.append([batch["image"].shape, sorted(batch), trainer.network.conv1.weight.detach().clone()])

    @trainer.on(Events.ITERATION_COMPLETED)
    def after(engine):
        seen[-1][2] = float((trainer.network.conv1.weight.detach() - seen[-1][2]).abs().max())

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ignoring non-scalar output")  # loss loggers skip the empty steps
        trainer.run()

    assert [shape[0] for shape, _, _ in seen] == [0, 0, 2, 0]
    assert seen[0][0][1:] == seen[2][0][1:] and seen[0][1] == seen[2][1]  # the empty batch has a real batch's structure
    assert all(delta > 0 for _, _, delta in seen)  # noise moved the weights on every step, empty ones included
    assert state.empty_steps == 3 and state.steps_taken == len(steps) == trainer.state.iteration == 4
    assert "train_auc" in trainer.state.metrics  # metrics skipped the empty batches instead of crashing

    sizes = [len(b) for _, b in zip(range(200), trainer.data_loader.batch_sampler)]
    assert len(set(sizes)) > 2 and 0 in sizes  # Poisson sampling: variable sizes, empty ones included


def test_batchnorm_bundle_is_refused_with_the_override_to_use(tiny_cohort, tiny_overrides, tmp_path):
    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    trainer = _workflow(tiny_cohort, tiny_overrides, tmp_path, norm="batch").trainer
    optimizer, loader = trainer.optimizer, trainer.data_loader
    with pytest.raises(ValueError, match="norm=group") as err:
        enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0)
    assert "BatchNorm2d" in str(err.value)
    assert trainer.optimizer is optimizer and trainer.data_loader is loader  # nothing was changed
    assert not hasattr(trainer.network, "autograd_grad_sample_hooks")


def _conv_case(seed=0, **conv):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Conv2d(3, 5, **conv).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(4, 3, 9, 9, generator=g, dtype=torch.float64)
    return layer, x


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, bias=False),
                                  dict(kernel_size=(2, 3), dilation=2, padding=(1, 0))])
@pytest.mark.parametrize("mode", ["ghost", "direct"])
def test_conv2d_norm_sampler_matches_opacus_per_sample_gradient_norms(conv, mode):
    """Both forms of the conv norm sampler give the norms of Opacus' own per-sample gradients (its conv grad sampler)."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from monai_fl_ext.privacy.ghost import conv2d_norm_sample

    layer, x = _conv_case(**conv)
    backprops = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = compute_conv_grad_sample(layer, [x], backprops)
    got = conv2d_norm_sample(layer, [x], backprops, mode=mode)
    assert set(got) == set(expected)
    for p, gs in expected.items():
        torch.testing.assert_close(got[p], gs.reshape(len(gs), -1).norm(2, dim=1), rtol=1e-10, atol=1e-12)


def test_ghost_cost_rule_picks_ghost_for_few_positions_and_direct_for_many():
    from monai_fl_ext.privacy.ghost import ghost_is_cheaper

    assert ghost_is_cheaper(positions=16, fan_in=1152, out_channels=128)  # a late ResNet stage
    assert not ghost_is_cheaper(positions=1024, fan_in=49, out_channels=64)  # the 7x7 stem at 64 px


@pytest.mark.parametrize("clip", [0.05, 1e3])  # every sample clipped / none clipped
def test_mixed_ghost_step_equals_opacus_hooks_step(clip):
    """The same network and batch: mixed ghost's clipped sum (hence the noiseless DP-SGD gradient) is hooks mode's."""
    import copy

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from monai_fl_ext.networks import resnet18
    from monai_fl_ext.privacy.ghost import make_grad_sample_module, make_optimizer

    torch.manual_seed(0)
    net = resnet18(norm="group", width=0.125, num_classes=3).double()
    x = torch.rand(5, 1, 24, 24, dtype=torch.float64)
    y = (torch.rand(5, 3) < 0.4).double()
    grads, norms = [], []
    for wrap, opt_class in ((GradSampleModule, DPOptimizer), (make_grad_sample_module, make_optimizer)):
        model = copy.deepcopy(net)
        keep = wrap(model, batch_first=True, loss_reduction="mean", strict=True)
        opt = opt_class(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                        expected_batch_size=5, loss_reduction="mean")
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        if opt_class is DPOptimizer:
            norms.append(torch.stack([g.reshape(5, -1).norm(2, dim=1) for g in opt.grad_samples], 1).norm(2, dim=1))
        assert opt.pre_step()
        if opt_class is not DPOptimizer:
            norms.append(opt.per_sample_norms)
            assert all(getattr(p, "_ghost", None) is None for p in model.parameters())  # records freed
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        del keep
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-9, atol=1e-12)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


def test_trainer_runs_mixed_ghost_mode_and_empty_batches(tiny_cohort, tiny_overrides, tmp_path):
    from monai_fl_ext.privacy.dp_sgd import enable_dp_sgd

    workflow = _workflow(tiny_cohort, tiny_overrides, tmp_path)
    trainer = workflow.trainer
    with pytest.raises(ValueError, match="grad_sample_mode"):
        enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    start = _weights(trainer.network)
    state = enable_dp_sgd(trainer, noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode="mixed_ghost")
    assert state.grad_sample_mode == "mixed_ghost"
    calls = _count_steps(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.run()
    assert state.steps_taken == len(calls) == len(trainer.data_loader) >= 1
    end = _weights(trainer.network)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert all(torch.isfinite(v).all() for v in end.values() if v.is_floating_point())
    # a noise-only step on an empty batch (what the iteration wrapper does) works in this mode too
    opt = state.optimizer
    opt.zero_grad()
    for p in opt.params:
        p.grad_sample = torch.zeros((0, *p.shape))
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in opt.params)
