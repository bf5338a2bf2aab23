"""checkpoint2model.py: plain weights out of a training checkpoint, raw or EMA."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prefork
from image_classification.models import get_entry

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return prefork.run([sys.executable, str(ROOT / "checkpoint2model.py"), *args], cwd=ROOT)


@pytest.mark.slow
def test_extracts_raw_and_ema_weights(tmp_path):
    model = get_entry("efficientnet-b0")(num_classes=4)
    raw = {f"module.{k}": v for k, v in model.state_dict().items()}
    ema = {k: v.float() + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 2, "best_prec1": 42.0, "state_dict": raw, "state_dict_ema": ema, "optimizer": {}}, ckpt)

    result = run("--checkpoint-path", str(ckpt), "--weight-path", str(tmp_path / "raw.pth"))
    assert result.returncode == 0, result.stderr
    assert "42.0" in result.stdout
    weights = torch.load(tmp_path / "raw.pth", weights_only=True)
    assert list(weights) == list(model.state_dict())
    torch.testing.assert_close(weights["stem.conv.weight"], model.stem.conv.weight)

    assert run("--checkpoint-path", str(ckpt), "--weight-path", str(tmp_path / "ema.pth"), "--ema").returncode == 0
    ema_weights = torch.load(tmp_path / "ema.pth", weights_only=True)
    torch.testing.assert_close(ema_weights["stem.conv.weight"], model.stem.conv.weight + 1)
    get_entry("efficientnet-b0")(num_classes=4, pretrained_from_file=str(tmp_path / "ema.pth"))


@pytest.mark.slow
def test_ema_flag_without_ema_weights_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "best_prec1": 0.0, "state_dict": {"w": torch.zeros(1)}}, ckpt)
    result = run("--checkpoint-path", str(ckpt), "--weight-path", str(tmp_path / "out.pth"), "--ema")
    assert result.returncode == 1
    assert "--use-ema" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.slow
def test_safetensors_round_trip_gives_identical_logits_through_every_loader(tmp_path):
    from image_classification.deploy.export import main as model2onnx
    from image_classification.deploy.classify import main as classify
    from image_classification.models.weights import WeightsError
    from PIL import Image
    torch.manual_seed(0)
    model = get_entry("efficientnet-b0")(num_classes=4).eval()
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "best_prec1": 1.0, "state_dict": model.state_dict(), "optimizer": {}}, ckpt)
    out = tmp_path / "b0.safetensors"
    assert run("--checkpoint-path", str(ckpt), "--weight-path", str(out)).returncode == 0
    assert out.read_bytes()[8:9] == b"{"  # safetensors: an 8-byte header length, then its JSON header
    forced = tmp_path / "b0.bin"
    assert run("--checkpoint-path", str(ckpt), "--weight-path", str(forced), "--format", "safetensors").returncode == 0
    assert forced.read_bytes() == out.read_bytes()

    loaded = get_entry("efficientnet-b0")(num_classes=4, pretrained_from_file=str(out)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert classify(["--arch", "efficientnet-b0", "--num_classes", "4", "--pretrained-from-file", str(out),
                     "--image", str(image), "--image-size", "32", "--precision", "FP32"]) == 0
    assert model2onnx(["--arch", "efficientnet-b0", "--num_classes", "4", "--pretrained-from-file", str(out),
                       "--image-size", "32", "-b", "1", "--output", str(tmp_path / "b0.onnx"), "--device", "cpu"]) == 0

    # A safetensors file of another model is refused as any weights file is: the keys that differ are named.
    from image_classification.atomic import atomic_save_safetensors
    atomic_save_safetensors({**model.state_dict(), "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): extra.weight"):
        get_entry("efficientnet-b0")(num_classes=4, pretrained_from_file=str(tmp_path / "extra.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="broken.safetensors: not a readable safetensors file"):
        get_entry("efficientnet-b0")(num_classes=4, pretrained_from_file=str(tmp_path / "broken.safetensors"))
