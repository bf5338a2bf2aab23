"""model2onnx.py / image_classification.deploy.export: opset, dynamic batch, onnxruntime agreement, names, errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import prefork
from image_classification.deploy.export import DEFAULT_TOLERANCE, ExportError, default_output, export_onnx, main, \
    verify_onnx
from image_classification.models import get_entry

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32


def _model(arch: str, **params) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_entry(arch)(num_classes=10, **params)
    # A fresh init has BatchNorm statistics that do not fit its activations, and logits near 0: with the
    # statistics of a batch, logits reach tens of units, as a trained model's do.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def _batch_dim(path: Path) -> str:
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param


@pytest.mark.parametrize("arch,params", [("efficientnet-b0", {}), ("efficientnet-widese-b0", {}),
                                         ("efficientnet-b0", {"trt": True})])
@pytest.mark.slow
def test_export_agrees_with_pytorch_on_another_batch_size(arch, params, tmp_path):
    model = _model(arch, **params)
    path = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, batch_size=1)
    graph = onnx.load(str(path))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 13
    assert _batch_dim(path) == "batch"
    for batch in (1, 3):
        inputs = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        diff = verify_onnx(model, path, inputs)
        with torch.no_grad():
            largest = model(inputs).abs().max().item()
        assert largest > 1.0  # the check is on logits of a few units, not on numbers near zero
        assert diff <= 1e-4 * largest


@pytest.mark.slow
def test_mismatch_is_an_error(tmp_path):
    model = _model("efficientnet-b0")
    path = export_onnx(model, tmp_path / "b0.onnx", image_size=SIZE)
    model.classifier.fc.bias.data += 1.0
    with pytest.raises(ExportError, match="disagree"):
        verify_onnx(model, path, torch.randn(2, 3, SIZE, SIZE), tolerance=DEFAULT_TOLERANCE)


@pytest.mark.slow
def test_export_and_verification_run_in_true_fp32(tmp_path, monkeypatch):
    """cuDNN's TF32 convolutions are on by default; onnxruntime's are float32, so the check must compare float32."""
    import image_classification.deploy.export as export
    seen = []
    for name in ("export_onnx", "verify_onnx"):
        original = getattr(export, name)
        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return _original(*args, **kwargs)
        monkeypatch.setattr(export, name, spy)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert main(["--arch", "efficientnet-b0", "--num_classes", "4", "--image-size", str(SIZE), "-b", "1",
                     "--output", str(tmp_path / "b0.onnx"), "--device", "cpu"]) == 0
        assert seen == [("export_onnx", False, False), ("verify_onnx", False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    model = _model("efficientnet-b0")
    with pytest.raises(ExportError, match="opset 18"):
        export_onnx(model, tmp_path / "d.onnx", image_size=SIZE, dynamo=True)
    path = export_onnx(model, tmp_path / "d.onnx", image_size=SIZE, batch_size=1, opset=18, dynamo=True)
    assert _batch_dim(path) and not _batch_dim(path).isdigit()
    assert verify_onnx(model, path, torch.randn(5, 3, SIZE, SIZE)) < 1e-3


def test_default_output_names():
    assert default_output("w/b0.pth", "efficientnet-b0") == Path("w/b0.onnx")
    assert default_output("w/b0.pt", "efficientnet-b0") == Path("w/b0.onnx")
    assert default_output("depth/checkpoint.pth.tar", "efficientnet-b0") == Path("depth/checkpoint.onnx")
    assert default_output("weights", "efficientnet-b0") == Path("weights.onnx")
    assert default_output(None, "efficientnet-b4") == Path("efficientnet-b4.onnx")


def test_model2onnx_cli(tmp_path, capsys):
    weights = tmp_path / "b0.pth"
    torch.save(_model("efficientnet-b0").state_dict(), weights)
    code = main(["--arch", "efficientnet-b0", "--pretrained-from-file", str(weights), "--num_classes", "10",
                 "--image-size", str(SIZE), "-b", "2", "--device", "cpu", "--verify-batch-size", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "b0.onnx").is_file()
    assert "max abs difference" in out and "batch of 3" in out
    # Weights for another arch: one line, exit 1.
    code = main(["--arch", "efficientnet-widese-b0", "--pretrained-from-file", str(weights), "--num_classes", "10",
                 "--image-size", str(SIZE), "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "does not fit" in err
    with pytest.raises(SystemExit) as exc:
        main(["--arch", "nope"])
    assert exc.value.code == 2 and "efficientnet-b0" in capsys.readouterr().err


@pytest.mark.slow
def test_model2onnx_script_errors_without_traceback(tmp_path):
    result = prefork.run([sys.executable, str(ROOT / "model2onnx.py"), "--arch", "efficientnet-b0",
                          "--pretrained-from-file", str(tmp_path / "missing.pth"), "--image-size", str(SIZE)],
                         cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "no such file" in result.stderr


@pytest.mark.slow
def test_quantized_export_has_qdq_nodes(tmp_path, capsys):
    from image_classification.toolkit.quantization import calibrate
    model = get_entry("efficientnet-quant-b0")(num_classes=10)
    calibrate(model, [torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))], num_batches=1,
              calibrator="max")
    weights = tmp_path / "quantized_b0.pth"
    torch.save(model.state_dict(), weights)
    code = main(["--arch", "efficientnet-quant-b0", "--pretrained-from-file", str(weights), "--num_classes", "10",
                 "--image-size", str(SIZE), "-b", "1", "--device", "cpu", "--verify-batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tolerance 0.15 x max(1, largest |logit|)" in out  # the INT8 bound unless --tolerance says otherwise
    graph = onnx.load(str(tmp_path / "quantized_b0.onnx"))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert _batch_dim(tmp_path / "quantized_b0.onnx") == "batch"
    # Without ranges (uncalibrated) the export is refused with one line.
    code = main(["--arch", "efficientnet-quant-b0", "--num_classes", "10", "--image-size", str(SIZE),
                 "--output", str(tmp_path / "u.onnx")])
    assert code == 1 and "no ranges" in capsys.readouterr().err


@pytest.mark.slow
def test_efficientnet_v2_s_exports_and_defaults_to_its_evaluation_size(tmp_path, capsys):
    assert get_entry("efficientnet-v2-s").default_eval_image_size == 384  # trains at 300, evaluated larger
    weights = tmp_path / "v2s.pth"
    torch.save(_model("efficientnet-v2-s").state_dict(), weights)
    code = main(["--arch", "efficientnet-v2-s", "--pretrained-from-file", str(weights), "--num_classes", "10",
                 "--image-size", str(SIZE), "--device", "cpu", "--verify-batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"[batch, 3, {SIZE}, {SIZE}]" in out and "onnxruntime agrees" in out
    assert _batch_dim(tmp_path / "v2s.onnx") == "batch"


def test_model2onnx_refuses_weights_with_nan_naming_file_and_tensor(tmp_path, capsys):
    weights = tmp_path / "diverged.pth"
    state = _model("efficientnet-b0").state_dict()
    state["layers.2.block1.depsep.bn.running_var"][3] = float("nan")
    torch.save(state, weights)
    code = main(["--arch", "efficientnet-b0", "--pretrained-from-file", str(weights), "--num_classes", "10",
                 "--image-size", str(SIZE), "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [
        f"model2onnx.py: error: {weights}: layers.2.block1.depsep.bn.running_var holds NaN or infinite values (the "
        "run that wrote these weights diverged); use an earlier checkpoint"]
    assert not (tmp_path / "x.onnx").exists()


def test_model2onnx_reads_arch_class_count_and_size_from_a_training_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "efficientnet-widese-b0", "classes": ["a", "b", "c"],
                "state_dict": get_entry("efficientnet-widese-b0")(num_classes=3).state_dict(),
                "args": {"image_size": 40, "eval_image_size": 48, "model_args": {"num_classes": 3}}}, checkpoint)
    code = main(["--pretrained-from-file", str(checkpoint), "--device", "cpu", "-b", "1", "--verify-batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"exported efficientnet-widese-b0 to {tmp_path / 'model_best.onnx'} (opset 13, input "
                          "'input' [batch, 3, 48, 48], output 'output' [batch, 3], batch dynamic)")
    code = main(["--pretrained-from-file", str(checkpoint), "--num_classes", "1000", "--output",
                 str(tmp_path / "x.onnx")])
    assert code == 1 and capsys.readouterr().err.strip() == (
        f"model2onnx.py: error: {checkpoint}: the weights score 3 classes, --num_classes is 1000; give --num_classes 3 "
        "or leave it out (the weights' count is the default)")
