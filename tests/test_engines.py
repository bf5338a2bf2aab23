"""Inference engines (image_classification/engines.py): agreement with PyTorch fp32, INT8 kernels, BatchNorm
folding, classify.py --engine, and a missing engine package."""
from __future__ import annotations

import re
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

from image_classification.deploy.batchnorm_folding import fold_batchnorm
from image_classification.context import create_context
from image_classification.deploy.engines import ONNX_ENGINES, EngineError, TorchEngine, onnx_io_sizes, open_engine
from image_classification.deploy.export import DEFAULT_TOLERANCE, QUANTIZED_TOLERANCE
from image_classification.deploy.export import main as model2onnx
from image_classification.deploy.classify import main as classify
from image_classification.models import get_entry

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = 10
B0_CONVOLUTIONS = 81  # stem, 16 blocks' expand/depthwise/SE/project convolutions, head


def _trained_like(arch: str) -> torch.nn.Module:
    """`arch` with BatchNorm statistics of a batch and logits spread as a trained model's (not all near 0)."""
    torch.manual_seed(0)
    model = get_entry(arch)(num_classes=CLASSES)
    with torch.no_grad():
        model.classifier.fc.weight.mul_(40)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0
        model.train()(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    """A float b0 (10 classes), its weights and its model2onnx.py export at 32 px."""
    root = tmp_path_factory.mktemp("float")
    model = _trained_like("efficientnet-b0")
    torch.save(model.state_dict(), root / "b0.pth")
    assert model2onnx(["--arch", "efficientnet-b0", "--pretrained-from-file", str(root / "b0.pth"), "--num_classes",
                       str(CLASSES), "--image-size", str(SIZE), "-b", "1", "--device", "cpu"]) == 0
    return model, root / "b0.onnx"


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory, generated):
    """efficientnet-quant-b0 calibrated from a briefly trained float b0, its Q/DQ export with BatchNorm folded
    (model2onnx.py verifies it), and the validation images at 32 px.

    INT8 agreement needs trained weights: in a randomly initialised network every layer's output is noise of
    the same size as its signal, and a last-bit difference that moves one value across an INT8 rounding step
    changes the logits by half their range. 20 SGD steps give weights whose engines agree to 1 %.
    """
    import torch.nn.functional as F

    from image_classification.toolkit.quantization import calibrate
    sys.path.insert(0, str(ROOT / "bench"))
    from qat_accuracy import image_folder
    root = tmp_path_factory.mktemp("int8")
    images, labels = image_folder(generated / "train", SIZE)
    torch.manual_seed(0)
    model = get_entry("efficientnet-b0")(num_classes=3, bn_momentum=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        index = torch.randperm(len(images))[:12]
        loss = F.cross_entropy(model.train()(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), root / "float.pth")
    quant = get_entry("efficientnet-quant-b0")(num_classes=3, pretrained_from_file=str(root / "float.pth"))
    calibrate(quant, [images[:12], images[12:]], num_batches=2)
    torch.save(quant.state_dict(), root / "qat.pth")
    assert model2onnx(["--arch", "efficientnet-quant-b0", "--pretrained-from-file", str(root / "qat.pth"),
                       "--num_classes", "3", "--image-size", str(SIZE), "-b", "1", "--device", "cpu",
                       "--fold-batchnorm"]) == 0
    return quant.eval(), root / "qat.onnx", image_folder(generated / "val", SIZE)[0]


@pytest.mark.parametrize("engine", ["torch", *ONNX_ENGINES])
def test_float_engines_agree_with_pytorch(engine, float_file):
    model, path = float_file
    runner = TorchEngine(model, create_context("cpu", amp=False)) if engine == "torch" else open_engine(engine, path)
    for n in (1, 3):  # OpenVINO compiles each batch size with its shape fixed
        images = _batch(n)
        with torch.no_grad():
            expected = model(images).numpy()
        actual = runner.run(images.numpy())
        assert actual.shape == (n, CLASSES) and actual.dtype == np.float32
        # The export check's bound: summation order only.
        assert np.abs(actual - expected).max() <= DEFAULT_TOLERANCE * max(1.0, np.abs(expected).max())
    if engine != "torch":
        report = runner.describe()
        assert report["int8_convolutions"] == 0 and report["float_convolutions"] > 0
    if engine == "openvino":
        assert report["INFERENCE_PRECISION_HINT"] == "f32" and report["static_shape"] == [1, 3, SIZE, SIZE]


@pytest.mark.parametrize("engine", ONNX_ENGINES)
@pytest.mark.slow
def test_int8_file_agrees_with_the_fake_quantized_model(engine, int8_file):
    model, path, images = int8_file
    with torch.no_grad():
        expected = model(images).numpy()
    runner = open_engine(engine, path)
    actual = runner.run(images.numpy())
    # As model2onnx.py's Q/DQ check: last-bit differences move values across INT8 rounding steps.
    assert np.abs(actual - expected).max() <= QUANTIZED_TOLERANCE * max(1.0, np.abs(expected).max())
    assert (actual.argmax(1) == expected.argmax(1)).all()
    report = runner.describe()
    if engine == "openvino":  # every convolution runs on INT8 inputs and weights
        assert report["int8_convolutions"] == B0_CONVOLUTIONS and report["float_convolutions"] == 0
    else:  # onnxruntime fuses only DQ → Conv → Q groups; SiLU and BN sit between most convolutions and their Q
        assert report["int8_convolutions"] + report["float_convolutions"] == B0_CONVOLUTIONS


@pytest.mark.slow
def test_fold_batchnorm_keeps_the_function_and_the_int8_weights():
    model = _trained_like("efficientnet-b0")
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = _batch(4)
    with torch.no_grad():
        expected, actual = model(images), folded(images)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched

    from image_classification.models.quantized import quantizers
    from image_classification.toolkit.quantization import calibrate
    quant = _trained_like("efficientnet-quant-b0")
    calibrate(quant, [_batch(8, seed=0)], num_batches=1, calibrator="max")
    folded = fold_batchnorm(quant)
    # Weights alone quantized: the folded INT8 weights are the original ones times the BN scale, exactly but
    # for float rounding, which may move a weight sitting on a rounding boundary by one step (activation
    # quantizers would turn every such difference into whole steps downstream).
    for net in (quant, folded):
        for name, quantizer in quantizers(net).items():
            if not name.endswith("weight_quantizer"):
                quantizer.disable()
    with torch.no_grad():
        expected, actual = quant(images), folded(images)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_onnx_io_sizes(float_file, tmp_path):
    assert onnx_io_sizes(float_file[1]) == (SIZE, CLASSES)
    (tmp_path / "bad.onnx").write_text("not onnx")
    with pytest.raises(EngineError, match=r"bad.onnx: not an ONNX model"):
        onnx_io_sizes(tmp_path / "bad.onnx")
    with pytest.raises(EngineError, match=r"missing.onnx: no such file"):
        open_engine("onnxruntime", tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(EngineError, match=r"^--onnx \S+empty.onnx: empty file \(0 bytes; an export that did not "
                                          r"finish\?\)$"):
        onnx_io_sizes(tmp_path / "empty.onnx")
    for engine in ONNX_ENGINES:
        with pytest.raises(EngineError, match=r"empty.onnx: empty file"):
            open_engine(engine, tmp_path / "empty.onnx")
    (tmp_path / "noinputs.onnx").write_bytes(b"\x08\x07")  # a valid protobuf: an ONNX model without a graph
    with pytest.raises(EngineError, match=r"noinputs.onnx: not an ONNX model \(no graph inputs or outputs\)$"):
        onnx_io_sizes(tmp_path / "noinputs.onnx")


# --- classify.py --engine ---------------------------------------------------------------------------------------

LINE = re.compile(r"^(?P<name>.+): (?P<prob>\d+\.\d)%$")


def _top5(out: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """classify.py's output as (path, [(class, percent) x 5]) per image."""
    lines = out.splitlines()
    blocks = []
    for i in range(0, len(lines), 6):
        top = [LINE.match(line) for line in lines[i + 1:i + 6]]
        assert all(top), lines[i:i + 6]
        blocks.append((lines[i], [(m["name"], float(m["prob"])) for m in top]))
    return blocks


@pytest.mark.parametrize("engine", ONNX_ENGINES)
@pytest.mark.slow
def test_classify_engine_prints_the_same_top5_as_pytorch(engine, float_file, generated, capsys):
    images = sorted(str(p) for p in (generated / "val").rglob("*.jpg"))[:4]
    weights = float_file[1].with_suffix(".pth")
    assert classify(["--arch", "efficientnet-b0", "--pretrained-from-file", str(weights), "--num_classes",
                     str(CLASSES), "--image-size", str(SIZE), "--precision", "FP32", "--cpu", "--image", *images]) == 0
    expected = _top5(capsys.readouterr().out)
    assert classify(["--engine", engine, "--onnx", str(float_file[1]), "--image", *images]) == 0
    actual = _top5(capsys.readouterr().out)
    assert [path for path, _ in actual] == images == [path for path, _ in expected]
    for (_, want), (_, got) in zip(expected, actual):
        assert [name for name, _ in got] == [name for name, _ in want]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= 0.1  # one printed decimal


def test_classify_engine_flag_errors(float_file, generated, capsys):
    image = str(next((generated / "val").rglob("*.jpg")))
    onnx_file = str(float_file[1])
    cases = [
        (["--engine", "openvino", "--image", image], "give --onnx FILE"),
        (["--arch", "efficientnet-b0", "--onnx", onnx_file, "--image", image], "--onnx runs in --engine"),
        (["--engine", "onnxruntime", "--onnx", onnx_file, "--precision", "FP32", "--image", image],
         "--precision apply to --engine torch"),
        (["--engine", "onnxruntime", "--onnx", onnx_file, "--arch", "efficientnet-b0", "--num_classes", "10",
          "--image", image], "--arch, --num_classes apply to --engine torch"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            classify(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert classify(["--engine", "onnxruntime", "--onnx", onnx_file, "--image-size", "64", "--image", image]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"classify.py: error: --image-size 64: --onnx {onnx_file} takes {SIZE} x {SIZE} images "
                           "(export another size with model2onnx.py --image-size)")


@pytest.mark.parametrize("package", ONNX_ENGINES)
def test_missing_engine_package_is_one_line_naming_it(package, float_file, generated, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now raises ImportError
    with pytest.raises(EngineError, match=rf"--engine {package} needs the {package} package.*pip install {package}=="):
        open_engine(package, float_file[1])
    image = str(next((generated / "val").rglob("*.jpg")))
    assert classify(["--engine", package, "--onnx", str(float_file[1]), "--image", image]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"classify.py: error: --engine {package} needs the {package} package")
