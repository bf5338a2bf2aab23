"""The fused CPU batch norm + SiLU (models/fused.py) against ATen's BatchNorm2d and SiLU."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from image_classification.models import fused, get_entry
from image_classification.models.common import ConvBnAct


def _channels_last(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale + offset).contiguous(memory_format=torch.channels_last)


def _batchnorm(channels: int, momentum: float | None = 0.01) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-3)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    # Sums over many rows in another order: compared relative to the tensor's largest value.
    assert (actual - expected).abs().max() <= rtol * expected.abs().max() + 1e-6


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("momentum", [0.01, None])
def test_training_matches_aten_batch_norm_and_silu(silu, momentum):
    torch.manual_seed(0)
    bn = _batchnorm(24, momentum)
    reference = copy.deepcopy(bn)
    # A large mean: the variance must keep its precision (shifted sums).
    x = _channels_last(6, 24, 9, 11, scale=3.0, offset=50.0)
    grad = _channels_last(6, 24, 9, 11)
    for _ in range(2):  # twice: the running statistics and num_batches_tracked move as ATen's do
        ours_in, reference_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        assert fused.applies(bn, ours_in)
        out = fused.batch_norm_act(bn, ours_in, silu)
        expected = reference(reference_in)
        expected = F.silu(expected) if silu else expected
        _close(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.backward(grad)
        expected.backward(grad)
        _close(ours_in.grad, reference_in.grad, rtol=1e-4)
    _close(bn.weight.grad, reference.weight.grad, rtol=1e-4)
    _close(bn.bias.grad, reference.bias.grad, rtol=1e-4)
    _close(bn.running_mean, reference.running_mean)
    _close(bn.running_var, reference.running_var)
    assert bn.num_batches_tracked.item() == reference.num_batches_tracked.item() == 2


def test_inference_uses_running_statistics():
    bn = _batchnorm(16)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    x = _channels_last(2, 16, 5, 5)
    with torch.no_grad():
        assert fused.applies(bn, x)
        _close(fused.batch_norm_act(bn, x, silu=True), F.silu(bn(x)))


def test_only_eager_float32_channels_last_cpu_calls_apply():
    bn = _batchnorm(8)
    x = _channels_last(2, 8, 4, 4)
    assert fused.applies(bn, x)
    assert not fused.applies(bn, x.contiguous())  # NCHW
    assert not fused.applies(bn, x.to(torch.bfloat16))
    assert not fused.applies(bn, _channels_last(1, 8, 1, 1))  # one value per channel: ATen's error
    assert not fused.applies(nn.Identity(), x)  # a BN folded into its convolution
    bn.eval()
    assert not fused.applies(bn, x.requires_grad_())  # a frozen BN's backward stays ATen's
    fused.set_enabled(False)
    try:
        assert not fused.applies(bn.train(), x)
    finally:
        fused.set_enabled(True)


def _b0_pair():
    torch.manual_seed(0)
    model = get_entry("efficientnet-b0")(num_classes=5).to(memory_format=torch.channels_last)
    return model, copy.deepcopy(model)


def _step(model, x):
    torch.manual_seed(1)  # the same stochastic-depth and dropout draws
    out = model(x)
    out.square().mean().backward()
    return out


def test_model_training_step_matches_the_plain_layers():
    fast, plain = _b0_pair()
    assert isinstance(fast.stem, ConvBnAct)
    x = _channels_last(3, 3, 48, 48)
    out = _step(fast, x)
    fused.set_enabled(False)
    try:
        expected = _step(plain, x)
    finally:
        fused.set_enabled(True)
    _close(out, expected, rtol=1e-4)
    # Some gradients are rounding noise around 0 (a BN bias before a BN): compared on the model's scale.
    scale = max(p.grad.abs().max() for p in plain.parameters())
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * scale, name
    for (name, a), b in zip(fast.named_buffers(), plain.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name
    assert fast.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.slow
def test_scripted_and_traced_models_run_the_plain_layers():
    model, _ = _b0_pair()
    model.eval()
    x = _channels_last(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        traced = torch.jit.trace(model, x)
        other = _channels_last(2, 3, 32, 32)
        _close(scripted(x), expected)
        # A trace that had recorded the fused call would replay its output as a constant.
        _close(traced(other), model(other))


def test_without_a_compiler_training_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    fused._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fused.__name__):
            bn = _batchnorm(8)
            x = _channels_last(2, 8, 4, 4)
            assert not fused.applies(bn, x)
            assert not fused.applies(bn, x)
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1 and "no-such-compiler" in warnings[0].getMessage()
        model, _ = _b0_pair()
        _step(model, _channels_last(2, 3, 32, 32))
    finally:
        fused._library.cache_clear()


def test_the_build_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = fused.build()
    assert path.parent == tmp_path / "efficientnet-pytorch" / "kernels" and path.exists()
    built = path.stat().st_mtime_ns
    assert fused.build() == path and path.stat().st_mtime_ns == built
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_silu_of_large_negative_and_positive_inputs_is_finite():
    bn = nn.BatchNorm2d(8).eval()  # identity: weight 1, bias 0, running statistics 0 and 1
    values = torch.tensor([-3e38, -1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 1e4])
    x = values.view(1, 8, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fused.batch_norm_act(bn, x, silu=True)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, F.silu(bn(x)), rtol=1e-6, atol=1e-30)


def test_squeeze_excitation_training_matches_the_plain_module():
    from image_classification.models.common import SqueezeExcitation
    torch.manual_seed(0)
    se = SqueezeExcitation(24, 6)
    x = _channels_last(3, 24, 7, 5, scale=2.0)
    grad = _channels_last(3, 24, 7, 5)
    ours_in, plain_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert fused.se_applies(ours_in, se.squeeze, se.expand)
    out = se(ours_in)
    out.backward(grad)
    ours_grads = [p.grad.clone() for p in se.parameters()]
    se.zero_grad()
    expected = plain_in * se.attention(plain_in)  # the module's plain form
    expected.backward(grad)
    _close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(ours_in.grad, plain_in.grad, rtol=1e-5)
    for ours, plain in zip(ours_grads, (p.grad for p in se.parameters())):
        _close(ours, plain, rtol=1e-5)
    with torch.no_grad():
        assert not fused.se_applies(x, se.squeeze, se.expand)  # inference: ATen's forward is as fast
