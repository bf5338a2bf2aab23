"""--jit script: every float EfficientNet family compiles with TorchScript and computes what the eager model does.

The scripted model shares the eager model's parameters and buffers (the optimizer, the EMA and the checkpoint
all hold the eager one), so it must train through them; under CPU bf16 autocast it must cast as the eager model
does, including the depthwise convolutions that train in fp32 (models/common.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prefork
from image_classification.cli import EXIT_ERROR, UserError
from image_classification.models import fused, get_entry
from image_classification.models.common import _Fp32Conv
from image_classification.train.setup import compile_model
from reports import by_step, read_report

ROOT = Path(__file__).resolve().parents[1]

# One member of each family, at sizes that keep every stage's feature map at least 1x1.
FAMILIES = [("efficientnet-b0", 64), ("efficientnet-widese-b0", 32), ("efficientnet-lite0", 64),
            ("efficientnet-v2-s", 32)]


@pytest.fixture(autouse=True)
def aten_layers():
    """Scripted models run ATen's BN, SiLU and SE; eager is compared on the same layers (the fused CPU kernels,
    which eager uses where a feature map is 1x1 and so counts as channels_last, are checked in test_fused.py)."""
    fused.set_enabled(False)
    yield
    fused.set_enabled(True)


def build(arch: str, **params) -> nn.Module:
    torch.manual_seed(0)
    return get_entry(arch)(num_classes=5, **params)


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,size", FAMILIES, ids=[arch for arch, _ in FAMILIES])
@pytest.mark.slow
def test_scripted_model_computes_the_eager_output(arch, size):
    model = build(arch).eval()
    scripted = compile_model(model, "script")
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert list(scripted.state_dict()) == list(model.state_dict())
    x = images(size)
    with torch.no_grad():
        expected = model(x)
        for _ in range(3):  # the profiling runs and the optimised graph after them
            torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tensorrt_squeeze_excitation_is_scripted_too():
    model = build("efficientnet-b0", trt=True).eval()
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(compile_model(model, "script")(x), model(x), rtol=1e-5, atol=1e-6)


def train_step(module: nn.Module, params: nn.Module, x: torch.Tensor, seed: int, amp: bool = False
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(output, gradients of `params`) of one forward/backward of `module` with the global RNG at `seed`."""
    params.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = module(x)
    out.float().logsumexp(1).mean().backward()
    return out.detach(), [p.grad.clone() for p in params.parameters()]


@pytest.mark.slow
def test_scripted_model_trains_with_dropout_and_stochastic_depth():
    model = build("efficientnet-b0", survival_prob=0.5, dropout=0.3).train()
    scripted = compile_model(model, "script")
    x = images(32, batch=4)
    for _ in range(3):
        out, grads = train_step(scripted, model, x, seed=7)
        expected, expected_grads = train_step(model, model, x, seed=7)
        # The same random draws drop the same samples and activations as eager mode.
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert all(g.isfinite().all() for g in grads)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(train_step(scripted, model, x, seed=8)[0], out)  # dropout/drop path are random

    # Shared parameters and buffers: the scripted forward updates the eager model's BatchNorm statistics (what
    # checkpoints save), and a step of an optimizer over the eager model moves the scripted one.
    running_mean = model.stem.bn.running_mean.clone()
    scripted(x)
    assert not torch.equal(model.stem.bn.running_mean, running_mean)
    model.eval()
    scripted.eval()  # a scripted module keeps a training flag of its own
    with torch.no_grad():
        before = scripted(x)
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        after = scripted(x)
        torch.testing.assert_close(after, model(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before)


# Lite: its stride-2 depthwise convolutions pad (TF's SAME) before the fp32 path convolves.
@pytest.mark.parametrize("arch", ["efficientnet-b0", "efficientnet-lite0"])
@pytest.mark.slow
def test_scripted_model_under_cpu_bf16_autocast_casts_as_eager(arch):
    model = build(arch).train()
    scripted = compile_model(model, "script")
    x = images(32, batch=4)
    # Training: the depthwise convolutions run in fp32 in both (the eager one sums the weight gradient over the
    # batch in two halves, hence the gradient tolerance).
    for _ in range(3):
        out, grads = train_step(scripted, model, x, seed=3, amp=True)
        expected, expected_grads = train_step(model, model, x, seed=3, amp=True)
        assert out.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    model.eval()
    scripted.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


def test_scripted_model_in_channels_last():
    model = build("efficientnet-v2-s").eval().to(memory_format=torch.channels_last)
    scripted = compile_model(model, "script")
    x = images(32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


class PythonOnly(nn.Module):
    """A model calling an autograd.Function, which TorchScript cannot compile."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp32Conv.apply(x, self.weight, 1, 1, 3)


def test_unscriptable_model_error_names_the_cause_and_the_line():
    with pytest.raises(UserError) as err:
        compile_model(PythonOnly(), "script")
    message = str(err.value)
    assert "\n" not in message
    line = PythonOnly.forward.__code__.co_firstlineno + 1
    assert message.startswith("--jit script: this model cannot be scripted (RuntimeError: Python builtin")
    assert f"at test_jit_script.py:{line}); use --jit compile or --jit no" in message


def test_quantized_model_refuses_script_in_one_line():
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(UserError, match=r"^--jit script: efficientnet-quant-\* cannot be scripted: Model "
                                        r"Optimizer's TensorQuantizer .*; use --jit compile or --jit no$"):
        compile_model(get_entry("efficientnet-quant-b0")(num_classes=2), "script")


# --- main.py --jit script ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes of the generated dataset, 8 training and 2 validation images each, 40 px files."""
    from image_classification.data.generated import generate_dataset
    return generate_dataset(tmp_path_factory.mktemp("jit") / "data", num_classes=4, train_per_class=8,
                            val_per_class=2, image_size=40)


def main_py(data: Path, workspace: Path, *extra: str):
    return prefork.run([sys.executable, "main.py", str(data), "--arch", "efficientnet-b0", "--data-backend",
                        "pytorch", "--image-size", "32", "-b", "4", "--num_classes", "4", "--workers", "0",
                        "--epochs", "1", "--seed", "3", "--lr", "0.01", "--device", "cpu", "--jit", "script",
                        "--workspace", str(workspace), *extra], cwd=ROOT, timeout=300)


def summary(workspace: Path) -> dict:
    """The run summary (step []) of the workspace's report."""
    return by_step(read_report(workspace / "experiment_raport.json"))[()]


@pytest.mark.slow
def test_main_py_trains_and_evaluates_with_jit_script(tiny_data, tmp_path):
    trained = main_py(tiny_data, tmp_path / "train")
    assert trained.returncode == 0, trained.stderr
    result = summary(tmp_path / "train")
    assert result["train.loss"] > 0 and 0 <= result["val.top1"] <= 100
    checkpoint = tmp_path / "train" / "checkpoint.pth.tar"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 1

    # The scripted evaluation of the saved weights (BN statistics included) repeats the run's validation.
    evaluated = main_py(tiny_data, tmp_path / "eval", "--evaluate", "--pretrained-from-file", str(checkpoint))
    assert evaluated.returncode == 0, evaluated.stderr
    again = summary(tmp_path / "eval")
    assert again["val.top1"] == pytest.approx(result["val.top1"])
    assert again["val.loss"] == pytest.approx(result["val.loss"], rel=1e-4)


@pytest.mark.slow
def test_main_py_jit_script_of_a_quantized_model_is_one_error_line(tiny_data, tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    result = main_py(tiny_data, tmp_path, "--arch", "efficientnet-quant-b0")
    assert result.returncode == EXIT_ERROR
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "main.py: error: --jit script: efficientnet-quant-* cannot be scripted: Model Optimizer's TensorQuantizer "
        "(the fake-quantizers of every layer) is Python that TorchScript does not compile; "
        "use --jit compile or --jit no"]
