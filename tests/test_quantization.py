"""efficientnet-quant-*: quantizer placement, calibration, QAT, weights in and out, INT8 ONNX, quant_main.py."""
from __future__ import annotations

import copy
import json
import itertools
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prefork
from image_classification.cli import UserError
from image_classification.models import WeightsError, get_entry
from image_classification.models.quantized import QUANT_PRETRAINED_URLS, from_pytorch_quantization, \
    missing_ranges, quantizers, require_ranges, to_pytorch_quantization
from image_classification.toolkit.quantization import calibrate, export_onnx_quantized

ROOT = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 32, 4


def batches(n: int = 2, batch_size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (batch_size,), generator=g))
            for _ in range(n)]


def build(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_entry("efficientnet-quant-b0")(num_classes=CLASSES, **kwargs)


@pytest.fixture(scope="module")
def calibrated():
    """b0 calibrated the default way (histogram) on two random batches."""
    model = build()
    calibrate(model, batches(), num_batches=2)
    return model.eval()


def block_quantizers(model, prefix: str) -> set[str]:
    return {name[len(prefix):] for name in quantizers(model) if name.startswith(prefix)}


CONV = {"conv.input_quantizer", "conv.weight_quantizer"}
SE = {"se.squeeze.input_quantizer", "se.squeeze.weight_quantizer", "se.expand.input_quantizer",
      "se.expand.weight_quantizer", "se.mul_a_quantizer", "se.mul_b_quantizer"}


def test_quantizer_placement_on_b0():
    model = build()
    names = quantizers(model)
    # 81 convs and 1 linear (input + weight each), 16 SE multiplies (2 each), 9 residual adds.
    assert len(names) == 82 * 2 + 16 * 2 + 9 == 205
    assert block_quantizers(model, "stem.") == CONV
    assert block_quantizers(model, "features.") == CONV
    assert block_quantizers(model, "classifier.") == {"fc.input_quantizer", "fc.weight_quantizer"}
    depsep_proj = {f"{layer}.{q}" for layer in ("depsep", "proj") for q in CONV}
    expand = {f"expand.{q}" for q in CONV}
    # No expansion (stage 0), expanding stage head (stride or width change), residual block.
    assert block_quantizers(model, "layers.0.block0.") == depsep_proj | SE
    assert block_quantizers(model, "layers.1.block0.") == expand | depsep_proj | SE
    assert block_quantizers(model, "layers.1.block1.") == expand | depsep_proj | SE | {"residual_quantizer"}
    assert sum(name.endswith("residual_quantizer") for name in names) == 9
    for name, q in names.items():
        assert q.num_bits == 8
        assert q.axis == (0 if name.endswith("weight_quantizer") else None), name
    # BatchNorm and pooling stay float, as in the reference.
    assert not any(".bn." in name or "pooling" in name for name in names)
    assert model.layers[0].block0.se.squeeze.weight.dim() == 4  # TensorRT SE form
    with pytest.raises(ValueError, match="TensorRT form"):
        build(trt=False)


def test_uncalibrated_model_has_no_ranges():
    model = build()
    assert len(missing_ranges(model)) == 205
    with pytest.raises(WeightsError, match="stem.conv.input_quantizer"):
        require_ranges(model)


def test_default_calibration_sets_finite_positive_ranges(calibrated):
    assert missing_ranges(calibrated) == []
    for name, q in quantizers(calibrated).items():
        assert torch.isfinite(q.amax).all() and (q.amax > 0).all(), name
    assert calibrated.stem.conv.weight_quantizer.amax.shape == (32, 1, 1, 1)
    assert calibrated.classifier.fc.weight_quantizer.amax.shape == (CLASSES, 1)
    assert calibrated.stem.conv.input_quantizer.amax.shape == ()
    # The attention operand of the SE multiply is a sigmoid output.
    assert calibrated.layers[0].block0.se.mul_a_quantizer.amax <= 1.0


def test_an_activation_that_overflows_stops_calibration_in_one_line_naming_its_quantizer():
    model = build()
    with torch.no_grad():
        model.stem.bn.bias.fill_(3e38)  # finite weights whose activations are not: SiLU(3e38) * ... overflows
    with pytest.raises(UserError) as refused:
        calibrate(model, batches(), num_batches=2)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("calibration batch 0: the input of layers.0.block0.")
    assert "holds NaN or infinite values: the model's activations overflow" in message


def test_a_histogram_begun_on_a_batch_of_zeros_grows_to_the_next_batches():
    """An all-zero first batch gives zero-width histograms, which Model Optimizer cannot widen (OverflowError)."""
    zeros = [(torch.zeros(4, 3, SIZE, SIZE), torch.zeros(4, dtype=torch.int64))]
    model = build()
    calibrate(model, zeros + batches(), num_batches=3)
    reference = build()
    calibrate(reference, batches(), num_batches=2)
    for name, quantizer in quantizers(model).items():
        assert torch.isfinite(quantizer.amax).all() and (quantizer.amax > 0).all(), name
    # This input is SiLU(BN(conv(0))) = 0 on the zero batch: its restarted histogram holds the other batches only.
    name = "layers.0.block0.depsep.conv.input_quantizer"
    torch.testing.assert_close(quantizers(model)[name].amax, quantizers(reference)[name].amax)


def _devices(model: torch.nn.Module) -> set[str]:
    return {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}


@pytest.mark.parametrize("calibrator", ["histogram", "max"])
def test_calibration_leaves_every_range_on_the_models_device(calibrator, monkeypatch):
    """Model Optimizer's histogram calibrator returns CPU ranges for a model on any device; DDP on an NCCL-only
    group then fails to broadcast them. Here the model lives on the meta device and the calibrators (both made to
    return CPU ranges, without reading the meta activations) stand for that."""
    from image_classification.models.quantized import modelopt_quantization
    calib = modelopt_quantization().calib
    for kind in (calib.HistogramCalibrator, calib.MaxCalibrator):
        monkeypatch.setattr(kind, "collect", lambda self, x: None)
        monkeypatch.setattr(kind, "compute_amax", lambda self, *args, **kwargs: torch.tensor(1.0))
    model = build().to("meta")
    calibrate(model, [torch.randn(2, 3, SIZE, SIZE, device="meta")], num_batches=1, calibrator=calibrator)
    assert not missing_ranges(model)
    assert _devices(model) == {"meta"}


def test_loaded_ranges_join_the_models_device(calibrated):
    """A QAT checkpoint read on the CPU into a model already on its device (--resume, the EMA copy)."""
    from image_classification.models.weights import fit_state_dict
    model = build().to("meta")
    assert missing_ranges(model)
    model.load_state_dict(fit_state_dict(model, calibrated.state_dict(), source="qat.pth"))
    assert not missing_ranges(model)
    assert _devices(model) == {"meta"}


@pytest.mark.parametrize("calibrator", ["max", "percentile"])
def test_other_calibrators(calibrator):
    model = build()
    data = batches()
    stats = calibrate(model, data, num_batches=2, calibrator=calibrator, percentile=99.0)
    assert set(stats) == {"calib.total_ips", "calib.data_time", "calib.compute_latency"}
    assert stats["calib.total_ips"] > 0
    observed = data[0][0].abs().max().item()
    stem = model.stem.conv.input_quantizer.amax.item()
    if calibrator == "max":
        assert stem == pytest.approx(max(x.abs().max().item() for x, _ in data))
    else:
        assert 0 < stem < observed  # the 99th percentile clips the tail


@pytest.mark.slow
def test_qat_step_changes_weights_and_keeps_ranges(calibrated):
    model = copy.deepcopy(calibrated).train()
    ranges = {name: q.amax.clone() for name, q in quantizers(model).items()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, targets = batches(1, seed=1)[0]
    loss = torch.nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    # Straight-through gradients reach the weights behind the fake-quantizers.
    assert model.stem.conv.weight.grad.abs().sum() > 0
    optimizer.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, weights[name])]
    assert "stem.conv.weight" in changed and "classifier.fc.weight" in changed
    for name, q in quantizers(model).items():
        assert torch.equal(q.amax, ranges[name]), name


@pytest.mark.slow
def test_checkpoint_round_trip_through_checkpoint2model(calibrated, tmp_path):
    state = {f"module.{k}": v for k, v in calibrated.state_dict().items()}
    assert sum(k.endswith("._amax") for k in state) == 205
    checkpoint = tmp_path / "quantized_checkpoint.pth.tar"
    torch.save({"epoch": 1, "best_prec1": 12.5, "state_dict": state, "optimizer": {}}, checkpoint)
    weights = tmp_path / "quant.pth"
    result = prefork.run([sys.executable, str(ROOT / "checkpoint2model.py"), "--checkpoint-path", str(checkpoint),
                          "--weight-path", str(weights)], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded = get_entry("efficientnet-quant-b0")(num_classes=CLASSES, pretrained_from_file=str(weights)).eval()
    assert missing_ranges(loaded) == []
    x = batches(1, seed=2)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), calibrated(x), rtol=0, atol=0)
    # A resumed run loads the checkpoint into a freshly built (uncalibrated) model with load_state_dict.
    fresh = build()
    fresh.load_state_dict(calibrated.state_dict())
    assert missing_ranges(fresh) == []


def test_checkpoint_missing_ranges_is_a_clear_error(calibrated, tmp_path):
    state = calibrated.state_dict()
    dropped = ["layers.1.block1.residual_quantizer._amax", "layers.0.block0.se.mul_b_quantizer._amax"]
    for key in dropped:
        del state[key]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing for 2 of 205") as err:
        get_entry("efficientnet-quant-b0")(num_classes=CLASSES, pretrained_from_file=str(path))
    for key in dropped:
        assert key[: -len("._amax")] in str(err.value)
    # Float weights carry no ranges at all: accepted, to be calibrated.
    float_path = tmp_path / "float.pth"
    torch.save(get_entry("efficientnet-b0")(num_classes=CLASSES, trt=True).state_dict(), float_path)
    model = get_entry("efficientnet-quant-b0")(num_classes=CLASSES, pretrained_from_file=str(float_path))
    assert len(missing_ranges(model)) == 205


def ngc_qat_style(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVIDIA's 21.03.0 QAT layout: pytorch-quantization names, `module.layer<N>.`, [1]-shaped input ranges."""
    out = {}
    for key, value in to_pytorch_quantization(state_dict).items():
        key = re.sub(r"^layers\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
        if key.endswith("_amax") and value.dim() == 0:
            value = value.reshape(1)
        out[f"module.{key}"] = value.clone()
    return out


@pytest.mark.slow
def test_ngc_qat_keys_map_onto_model_optimizer(calibrated, tmp_path):
    reference = ngc_qat_style(calibrated.state_dict())
    for key in ("module.stem.conv._input_quantizer._amax", "module.layer1.block0.depsep.conv._weight_quantizer._amax",
                "module.layer2.block1.residual_quantizer._amax", "module.layer1.block0.se.mul_a_quantizer._amax",
                "module.layer1.block0.se.squeeze._weight_quantizer._amax", "module.classifier.fc._input_quantizer._amax"):
        assert key in reference, key
    assert reference["module.layer1.block0.depsep.conv._weight_quantizer._amax"].shape == (32, 1, 1, 1)
    assert from_pytorch_quantization(to_pytorch_quantization(calibrated.state_dict())).keys() == \
        calibrated.state_dict().keys()
    path = tmp_path / "nvidia-efficientnet-quant-b0-130421.pth"
    torch.save(reference, path)
    model = get_entry("efficientnet-quant-b0")(num_classes=CLASSES, pretrained_from_file=str(path)).eval()
    x = batches(1, seed=3)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), calibrated(x), rtol=0, atol=0)
    assert get_entry("efficientnet-quant-b0").pretrained_url == QUANT_PRETRAINED_URLS["efficientnet-quant-b0"]
    assert get_entry("efficientnet-quant-b4").pretrained_url.endswith("nvidia-efficientnet-quant-b4-130421.pth")


@pytest.mark.slow
def test_onnx_export_has_qdq_and_onnxruntime_agrees(calibrated, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx_quantized(calibrated, tmp_path / "b0.onnx", image_size=SIZE, opset=13)
    graph = onnx.load(str(path))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 205
    assert graph.opset_import[0].version >= 13
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = batches(1, batch_size=3, seed=4)[0][0]
    with torch.no_grad():
        expected = calibrated(x).numpy()
    (got,) = session.run(None, {"input": x.numpy()})
    # Stated tolerance: 1e-3 of the largest logit (PyTorch and onnxruntime may round an exact .5 tie of
    # an INT8 value differently, one quantization step); the predicted classes agree.
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).all()
    with pytest.raises(WeightsError, match="no ranges"):
        export_onnx_quantized(build(), tmp_path / "uncalibrated.onnx", image_size=SIZE)


def image_folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    """A tiny ImageFolder tree (train/ and val/) of solid-colour-per-class PNGs."""
    from PIL import Image
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(g.normal(60 + 120 * c, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_quant_main_calibrates_trains_evaluates_and_resumes(tmp_path, capsys):
    pytest.importorskip("image_classification.train")
    import quant_main
    data = image_folder(tmp_path / "data")
    float_weights = tmp_path / "float.pth"
    torch.save(get_entry("efficientnet-b0")(num_classes=2).state_dict(), float_weights)
    # 64 px and batch 4: at 32 px and batch 2 the last stages are 1x1 and their BatchNorm normalises two values
    # per channel, whose backward multiplies the gradient ~10x per block (in float too): QAT diverges there.
    common = [str(data), "--arch", "efficientnet-quant-b0", "--num_classes", "2", "--data-backend", "pytorch",
              "--image-size", "64", "-b", "4", "-j", "0", "--optimizer", "sgd", "--lr", "0.001",
              "--workspace", str(tmp_path / "run"), "--print-freq", "1"]
    quant_main.main(common + ["--epochs", "1", "--pretrained-from-file", str(float_weights),
                              "--calibration-batches", "2", "--calibrator", "max"])
    checkpoint = tmp_path / "run" / "quantized_checkpoint.pth.tar"
    assert checkpoint.is_file()
    # The reference's names: only the latest checkpoint carries the quantized_ prefix.
    assert (tmp_path / "run" / "model_best.pth.tar").is_file()
    assert not (tmp_path / "run" / "quantized_model_best.pth.tar").exists()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1
    assert sum(k.endswith("._amax") for k in saved["state_dict"]) == 205
    report = [json.loads(line[5:]) for line in (tmp_path / "run" / "experiment_raport.json").read_text().splitlines()]
    calibration = [r for r in report if r["type"] == "LOG" and r["step"] == ["Calibration", 2]]
    assert calibration and {"calib.total_ips", "calib.data_time", "calib.compute_latency"} <= set(calibration[0]["data"])
    summary = {k: v for r in report if r["type"] == "LOG" and r["step"] == [] for k, v in r["data"].items()}
    assert summary["calib.total_ips"] == calibration[0]["data"]["calib.total_ips"]

    # --resume: the ranges come with the checkpoint, no calibration.
    quant_main.main(common + ["--epochs", "2", "--resume", str(checkpoint)])
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 2

    # --evaluate on the QAT weights; on float weights it names the quantizers without ranges.
    quant_main.main(common + ["--epochs", "1", "--evaluate", "--pretrained-from-file", str(checkpoint)])
    with pytest.raises(SystemExit) as exc:
        quant_main.main(common + ["--epochs", "1", "--evaluate", "--pretrained-from-file", str(float_weights)])
    assert exc.value.code == 1 and "stem.conv.input_quantizer" in capsys.readouterr().err


@pytest.mark.slow
def test_calibration_reads_batch_statistics_and_leaves_running_statistics_alone():
    model = build(trt=True).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
    calibrate(model, batches(2), num_batches=2)
    assert model.training and all(m.training and m.momentum == 0.01 for m in norms)
    for m, (mean, var, tracked) in zip(norms, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == tracked
    assert all(bool(torch.isfinite(q.amax).all()) for q in quantizers(model).values())


@pytest.mark.parametrize("arch,recipe", [
    ("b0", ["--optimizer", "sgd", "--lr", "0.0125", "--momentum", "0.89", "--weight-decay", "4.50e-05",
            "--lr-schedule", "cosine"]),
    ("b4", ["--optimizer", "rmsprop", "--lr", "4.09e-06", "--momentum", "0.9", "--weight-decay", "9.714e-04",
            "--lr-schedule", "linear", "--rmsprop-alpha", "0.853", "--rmsprop-eps", "0.00422"]),
])
@pytest.mark.slow
def test_qat_from_a_briefly_trained_float_model_stays_finite_at_the_recipes_settings(tmp_path, arch, recipe):
    # One epoch of two steps leaves BN's running statistics near their initial 0/1 (momentum 0.01). Ranges
    # calibrated with them (eval mode) were orders of magnitude off the activations QAT trains on (inf in b4,
    # whose histogram calibration then crashed) and the first QAT step's gradients were NaN.
    import quant_main
    from image_classification.arguments import parse_config
    from image_classification.train import run
    data = image_folder(tmp_path / "data")
    common = ["--num_classes", "2", "--data-backend", "pytorch", "--image-size", "32", "-b", "4", "-j", "0"]
    run(parse_config([str(data), "--arch", f"efficientnet-{arch}", *common, "--epochs", "2", "--run-epochs", "1",
                      "--workspace", str(tmp_path / "float")]))
    summary = quant_main.main([str(data), "--arch", f"efficientnet-quant-{arch}", *common, *recipe,
                               "--epochs", "2", "--run-epochs", "1", "--print-freq", "1", "--calibration-batches", "2",
                               "--pretrained-from-file", str(tmp_path / "float" / "checkpoint.pth.tar"),
                               "--workspace", str(tmp_path / "qat")])
    assert math.isfinite(summary["train.loss"])
    saved = torch.load(tmp_path / "qat" / "quantized_checkpoint.pth.tar", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in saved["state_dict"].values() if v.is_floating_point())
