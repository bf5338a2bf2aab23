"""Speed flags keep the numbers: channels_last, torch.compile and bf16 autocast against the plain fp32 NCHW path.

Tolerances (stated here because the README quotes them):
  channels_last vs NCHW, fp32          logits agree to 1e-4 of the largest logit, gradients to 1e-4 of the
                                       model's largest gradient
  torch.compile vs eager, fp32         the same at 1e-3 (also with inductor's freezing, --evaluate)
  bf16 autocast vs fp32 (CPU)          logits within 5 % (relative L2), the loss within 2 %
The fp32 bounds are summation-order differences of oneDNN kernels and inductor's fused reductions; bf16 keeps
8 mantissa bits, so only a loose agreement is meaningful.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from image_classification.context import create_context
from image_classification.models import get_entry
from image_classification.models.efficientnet import EFFICIENTNET_B0, EfficientNet
from image_classification.train.optimizers import build_optimizer
from image_classification.train.epoch import train_step
from image_classification.train.losses import TrainingLoss
from image_classification.train.setup import compile_model
from image_classification.train.state import Trainer

SIZE, BATCH, CLASSES = 64, 4, 10


def model_and_batch(small: bool = False):
    """b0 without dropout (compiled code draws its random numbers differently, which would hide the comparison).

    `small`: b0's first two stages only (both kinds of block, without and with the expansion convolution; a
    fraction of inductor's compile time).
    """
    torch.manual_seed(0)
    if small:
        model = EfficientNet(replace(EFFICIENTNET_B0, stages=EFFICIENTNET_B0.stages[:2]), dropout=0.0,
                             num_classes=CLASSES)
    else:
        model = get_entry("efficientnet-b0")(num_classes=CLASSES, dropout=0.0)
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    target = torch.randint(0, CLASSES, (BATCH,))
    return model, images, target


def largest(grads: dict) -> torch.Tensor:
    # Some gradients are pure rounding noise (a BN bias followed by another BN): compare to the model's largest.
    return max(g.abs().max() for g in grads.values())


def loss_and_grads(model: nn.Module, images: torch.Tensor, target: torch.Tensor, ctx) -> tuple[torch.Tensor, dict]:
    """Training-mode forward/backward through the training loop's own step (no optimizer step)."""
    engine = Trainer(ctx=ctx, model=model, train_model=model, loss=TrainingLoss(nn.CrossEntropyLoss()),
                     optimizer=build_optimizer(model, optimizer="rmsprop", lr=0.0, momentum=0.9, weight_decay=0.0),
                     scaler=ctx.grad_scaler())
    loss = train_step(engine, images.contiguous(memory_format=ctx.memory_format), target, optimizer_step=False)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str,
                        scale: torch.Tensor | None = None) -> None:
    """max |actual - expected| <= tolerance * scale (default scale: the largest |expected|)."""
    scale = (expected.abs().max() if scale is None else scale).clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= tolerance, f"{what}: max difference {error:.2e} of the largest magnitude > {tolerance}"


@pytest.mark.slow
def test_channels_last_matches_nchw():
    model, images, target = model_and_batch()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    model.eval(), nhwc.eval()
    with torch.no_grad():
        assert_close_scaled(nhwc(images.contiguous(memory_format=torch.channels_last)), model(images), 1e-4, "logits")
    model.train(), nhwc.train()
    loss, grads = loss_and_grads(model, images, target, create_context("cpu"))
    loss_cl, grads_cl = loss_and_grads(nhwc, images, target, create_context("cpu", memory_format="nhwc"))
    assert_close_scaled(loss_cl, loss, 1e-4, "loss")
    for name, grad in grads.items():
        assert_close_scaled(grads_cl[name], grad, 1e-4, f"grad of {name}", largest(grads))


@pytest.mark.slow
def test_compiled_matches_eager_inference():
    model, images, _ = model_and_batch(small=True)
    model.eval()
    compiled = compile_model(model, "compile")
    with torch.inference_mode():
        assert_close_scaled(compiled(images), model(images), 1e-3, "logits")


@pytest.mark.slow
def test_frozen_compile_matches_eager_and_compiles_the_weights_in():
    """main.py --evaluate --jit compile: inductor's freezing, which must really happen (torch.compile's
    options={"freezing": True} silently compiles unfrozen), and give the eager logits."""
    model, images, _ = model_and_batch(small=True)
    model.eval()
    frozen = compile_model(model, "compile", frozen=True).eval()
    with torch.no_grad():
        expected = model(images)
        assert_close_scaled(frozen(images), expected, 1e-3, "logits")
        bn = model.stem.bn
        saved = bn.running_var.clone()
        bn.running_var.mul_(4.0)  # changes the eager model's output; a frozen graph holds the old statistics
        try:
            assert not torch.allclose(model(images), expected, rtol=1e-3, atol=0)
            assert_close_scaled(frozen(images), expected, 1e-3, "logits after the weights changed")
        finally:
            bn.running_var.copy_(saved)


@pytest.mark.slow
def test_compiled_matches_eager_training_step():
    model, images, target = model_and_batch(small=True)
    twin = copy.deepcopy(model)
    ctx = create_context("cpu")
    loss, grads = loss_and_grads(model, images, target, ctx)
    engine_model = compile_model(twin, "compile")
    engine = Trainer(ctx=ctx, model=twin, train_model=engine_model, loss=TrainingLoss(nn.CrossEntropyLoss()),
                     optimizer=build_optimizer(twin, optimizer="rmsprop", lr=0.0, momentum=0.9, weight_decay=0.0),
                     scaler=ctx.grad_scaler())
    loss_c = train_step(engine, images, target, optimizer_step=False)
    assert_close_scaled(loss_c.detach(), loss, 1e-3, "loss")
    for name, p in twin.named_parameters():
        assert_close_scaled(p.grad, grads[name], 1e-3, f"grad of {name}", largest(grads))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="bf16 autocast on CPU needs oneDNN")
@pytest.mark.slow
def test_bf16_autocast_close_to_fp32():
    model, images, target = model_and_batch()
    model.eval()
    with torch.no_grad():
        reference = model(images)
        with create_context("cpu", amp=True).autocast():
            low = model(images)
    assert low.dtype == torch.bfloat16
    relative = (low.float() - reference).norm() / reference.norm()
    assert relative < 0.05, f"bf16 logits differ from fp32 by {relative:.3f} (relative L2)"
    model.train()
    loss, _ = loss_and_grads(copy.deepcopy(model), images, target, create_context("cpu"))
    loss_bf16, _ = loss_and_grads(copy.deepcopy(model), images, target, create_context("cpu", amp=True))
    assert loss_bf16.float().item() == pytest.approx(loss.item(), rel=0.02)


def test_amp_on_a_cpu_without_native_bf16_says_it_is_slow(monkeypatch):
    import image_classification.context as context
    monkeypatch.setattr(context, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="--amp on this CPU .* emulated"):
        ctx = create_context(device="cpu", amp=True)
    assert ctx.amp_dtype == torch.bfloat16  # the flag still does what it says
    monkeypatch.setattr(context, "cpu_has_native_bf16", lambda: True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_context(device="cpu", amp=True)


def test_classify_says_how_to_turn_its_default_amp_off(monkeypatch, tmp_path):
    import image_classification.context as context
    from image_classification.deploy.classify import build_classifier, parse_args
    monkeypatch.setattr(context, "cpu_has_native_bf16", lambda: False)
    args = parse_args(["--arch", "efficientnet-b0", "--num_classes", "3", "--image", str(tmp_path / "x.jpg")])
    with pytest.warns(UserWarning, match=r"--precision AMP \(the default\) on this CPU .* pass --precision FP32"):
        build_classifier(args)


def test_silu_works_in_place_only_where_autograd_records_nothing():
    from image_classification.models.common import SiLU
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    h = x * 2  # an interior activation, as in the network
    y = SiLU()(h)
    assert y.data_ptr() != h.data_ptr()  # nothing to clone for backward: the input is kept as it is
    torch.testing.assert_close(y, nn.functional.silu(h.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.func.grad(lambda t: nn.functional.silu(t * 2).sum())(x.detach()))
    with torch.no_grad():
        h = x * 2
        assert SiLU()(h).data_ptr() == h.data_ptr()


@pytest.mark.slow
def test_cpu_allocator_retain_reuses_pages_instead_of_faulting_them_in(tmp_path):
    """Freeing and re-allocating a 64 MiB tensor: glibc's defaults page-fault it in every time; under retain the
    heap stops growing after a few (glibc 2.36's posix_memalign leaves freed blocks unused for a while) and the
    pages are reused from then on."""
    import subprocess
    import sys
    script = (
        "import resource, sys, torch\n"
        "from image_classification.context import set_cpu_allocator\n"
        "assert set_cpu_allocator(sys.argv[1])\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(12):\n"
        "    torch.ones(2**24)\n"
        "start = faults()\n"
        "for _ in range(5):\n"
        "    torch.ones(2**24)\n"
        "print(faults() - start)\n")
    faults = {}
    for mode in ("retain", "system"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        faults[mode] = int(out.stdout.split()[-1])
    pages = 2**26 // 4096  # one 64 MiB tensor in 4 KiB pages
    assert faults["system"] > 4 * pages
    assert faults["retain"] < pages // 4
    with pytest.raises(ValueError, match="--cpu-allocator"):
        from image_classification.context import set_cpu_allocator
        set_cpu_allocator("jemalloc")


@pytest.mark.parametrize("batch, channels_last", [(1, False), (3, False), (4, True)])
def test_fp32_depthwise_backward_matches_autograd(batch, channels_last):
    """The bf16 step's depthwise conv in fp32, its backward half a batch at a time: autograd's fp32 gradients
    of the same bf16 input, rounded as the layer rounds them."""
    from image_classification.models.common import _Fp32Conv
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 9, 9).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, 3, 3)
    grad = torch.randn(batch, 8, 5, 5).to(torch.bfloat16)
    x.requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    _Fp32Conv.apply(x, w, (2, 2), (1, 1), 8).backward(grad)
    x32 = x.detach().float().requires_grad_(True)
    w32 = weight.clone().requires_grad_(True)
    torch.nn.functional.conv2d(x32, w32, None, 2, 1, 1, 8).backward(grad.float())
    torch.testing.assert_close(x.grad, x32.grad.to(torch.bfloat16))
    torch.testing.assert_close(w.grad, w32.grad, rtol=1e-5, atol=1e-5)
