"""Tests for monai_fl_ext.networks: shapes, MONAI checkpoint compatibility, and Opacus (DP-SGD) safety."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import resnet18 as monai_resnet18
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from monai_fl_ext.networks import NORMS, norm_spec, resnet18

NUM_CLASSES = 14
RESNET18_PARAMS = 11_178_318


def stock_resnet18() -> nn.Module:
    return monai_resnet18(spatial_dims=2, n_input_channels=1, num_classes=NUM_CLASSES, conv1_t_stride=2)


def bce_backward(model: nn.Module, batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Forward a random batch, BCE-with-logits against random multi-hot targets, backward; returns the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=g)
    y = (torch.rand(batch, NUM_CLASSES, generator=g) < 0.3).float()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    return loss


@pytest.fixture(scope="module", params=NORMS)
def model_by_norm(request):
    torch.manual_seed(0)
    return request.param, resnet18(norm=request.param, num_classes=NUM_CLASSES)


def test_output_shape_and_param_count(model_by_norm):
    _, model = model_by_norm
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) == RESNET18_PARAMS


def test_stock_monai_resnet18_has_the_same_param_count():
    assert sum(p.numel() for p in stock_resnet18().parameters()) == RESNET18_PARAMS


def test_state_dict_matches_stock_monai_and_loads_both_ways():
    torch.manual_seed(1)
    ours, source = resnet18(norm="batch"), stock_resnet18()
    ours_sd, stock_sd = ours.state_dict(), source.state_dict()
    assert list(ours_sd) == list(stock_sd)
    assert all(ours_sd[k].shape == stock_sd[k].shape for k in stock_sd)

    # stock -> ours, then ours -> a fresh stock model: strict loads, and the same function in eval mode
    ours.load_state_dict(source.state_dict(), strict=True)
    back = stock_resnet18()
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in source.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = source.eval()(x)
        torch.testing.assert_close(ours.eval()(x), expected)
        torch.testing.assert_close(back.eval()(x), expected)


def test_group_norm_variant_loads_stock_weights_without_running_stats():
    model, stock = resnet18(norm="group"), stock_resnet18()
    result = model.load_state_dict(stock.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in result.unexpected_keys
    )


def test_group_norm_model_has_no_batchnorm_and_gcd_groups():
    model = resnet18(norm="group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    # stem + 8 blocks x 2 + 3 downsample shortcuts
    assert len(group_norms) == 1 + 16 + 3
    for m in group_norms:
        assert m.num_groups == math.gcd(32, m.num_channels)
        assert m.affine


def test_norm_spec_group_uses_gcd_groups():
    for channels in (1, 3, 12, 48, 64, 100, 512):
        assert norm_spec("group", channels) == ("group", {"num_groups": math.gcd(32, channels)})


def test_opacus_validator_accepts_group_and_rejects_batch():
    assert ModuleValidator.validate(resnet18(norm="group"), strict=False) == []
    errors = ModuleValidator.validate(resnet18(norm="batch"), strict=False)
    assert errors
    assert any("BatchNorm" in str(e) for e in errors)


def test_no_inplace_modules(model_by_norm):
    _, model = model_by_norm
    inplace = [name for name, m in model.named_modules() if getattr(m, "inplace", False)]
    assert inplace == []


def test_stock_monai_resnet18_has_inplace_activations():
    # the reason this module exists: MONAI's blocks use ReLU(inplace=True) even when act is overridden at the stem
    stock = stock_resnet18()
    assert any(getattr(m, "inplace", False) for m in stock.modules())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_work():
    torch.manual_seed(0)
    model = resnet18(norm="group")
    wrapped = GradSampleModule(model)
    loss = bce_backward(wrapped, batch=4, size=32)
    assert torch.isfinite(loss)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for name, p in params:
        gs = getattr(p, "grad_sample", None)
        assert gs is not None, f"{name} has no grad_sample"
        assert gs.shape == (4, *p.shape), name
        assert torch.isfinite(gs).all(), name
        # loss_reduction="mean": the batch gradient is the mean of the per-sample gradients, which holds
        # only if no layer mixes samples (GroupNorm, unlike BatchNorm, is per sample).
        torch.testing.assert_close(gs.mean(0), p.grad, rtol=1e-3, atol=1e-6, msg=name)


def _stock_fixed_by_opacus() -> nn.Module:
    # Opacus' usual remedy swaps BatchNorm for GroupNorm but keeps MONAI's in-place ReLU / residual add.
    fixed = ModuleValidator.fix(stock_resnet18())
    assert ModuleValidator.validate(fixed, strict=False) == []
    return fixed


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("make_stock", [stock_resnet18, _stock_fixed_by_opacus], ids=["stock", "stock-opacus-fixed"])
def test_stock_monai_resnet18_fails_under_opacus(make_stock):
    torch.manual_seed(0)
    model = make_stock()
    with pytest.raises(Exception) as excinfo:
        wrapped = GradSampleModule(model)
        bce_backward(wrapped, batch=4, size=32)
    message = str(excinfo.value)
    assert "inplace" in message.lower() or "BatchNorm" in message, message


@pytest.mark.parametrize("bad", ["layer", "Group", "", "none"])
def test_invalid_norm_raises_naming_allowed_values(bad):
    with pytest.raises(ValueError) as excinfo:
        resnet18(norm=bad)
    message = str(excinfo.value)
    for allowed in NORMS:
        assert allowed in message
    assert repr(bad) in message


def test_width_option_keeps_depth_and_scales_channels():
    torch.manual_seed(0)
    default = resnet18(norm="group")
    torch.manual_seed(0)
    explicit = resnet18(norm="group", width=1.0, num_groups=32)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    narrow = resnet18(norm="group", width=0.25, num_groups=8)
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len([m for m in default.modules() if isinstance(m, nn.Conv2d)]) == 1 + 16 + 3  # same depth
    assert [narrow.layer1[0].conv1.out_channels, narrow.layer4[1].conv2.out_channels, narrow.fc.in_features] == [16, 128, 128]
    assert narrow.conv1.out_channels == 16 and narrow.bn1.num_channels == 16
    assert all(m.num_groups == math.gcd(8, m.num_channels) for m in narrow.modules() if isinstance(m, nn.GroupNorm))
    assert 600_000 < sum(p.numel() for p in narrow.parameters()) < 800_000  # ~1/16 of 11.2 M
    assert narrow(torch.randn(2, 1, 32, 32)).shape == (2, NUM_CLASSES)
    assert ModuleValidator.validate(narrow, strict=False) == []
    for bad in (dict(width=0), dict(width=0.001), dict(num_groups=0)):
        with pytest.raises(ValueError):
            resnet18(norm="group", **bad)
