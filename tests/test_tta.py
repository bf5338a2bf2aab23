"""Evaluation knobs: --tta flip (main.py validation, classify.py), --eval-crop-pct on both data backends, and
scripts/eval_sizes.py's table. CPU only, tiny sizes."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

import prefork
from image_classification.arguments import parse_args, parse_config
from image_classification.context import create_context
from image_classification.data import build_val_loader
from image_classification.data.loader import Normalizer, val_resize_size
from image_classification.data.pytorch_backend import load_rgb, val_transform
from image_classification.deploy.classify import load_image
from image_classification.deploy.classify import main as classify
from image_classification.models import efficientnet_b0
from image_classification.toolkit.tta import FlipTTA, with_tta
from tiny_model import TinyEntry

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
LINE = re.compile(r"^(?P<name>.+): (?P<prob>\d+\.\d)%$")
CPU = create_context(device="cpu")


def _mean_of_two_passes(model, images: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(model(images), 1) + torch.softmax(model(images.flip(3)), 1)) / 2


def test_flip_tta_is_the_mean_of_the_softmax_of_the_image_and_its_mirror():
    model = TinyEntry()(num_classes=3)
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = FlipTTA(model)(images)
        torch.testing.assert_close(out.exp(), _mean_of_two_passes(model, images))
        torch.testing.assert_close(torch.softmax(out, 1), _mean_of_two_passes(model, images))
    assert with_tta(model, "none") is model


@pytest.fixture(scope="module")
def weights(generated, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = efficientnet_b0(num_classes=3)
    model.classifier.fc.weight.data.mul_(40)  # confident, differing predictions
    path = tmp_path_factory.mktemp("tta") / "b0_3.pth"
    torch.save(model.state_dict(), path)
    return path


def test_validation_with_tta_scores_the_mean_of_the_two_passes(generated, weights, tmp_path):
    from image_classification.train import run
    summary = run(parse_config([str(generated), "--arch", "efficientnet-b0", "--num_classes", "3",
                               "--pretrained-from-file", str(weights), "--data-backend", "pytorch", "--workers", "0",
                               "--image-size", str(SIZE), "-b", "4", "--evaluate", "--tta", "flip",
                               "--workspace", str(tmp_path)]))
    model = efficientnet_b0(num_classes=3, pretrained_from_file=str(weights)).eval()
    loader = build_val_loader("pytorch", str(generated), image_size=SIZE, batch_size=4, ctx=CPU, num_classes=3,
                              workers=0, seed=0)
    loader.set_epoch(0)
    loss = correct = count = 0
    with torch.no_grad():
        for images, labels in loader:
            probs = _mean_of_two_passes(model, images)
            loss += F.nll_loss(probs.log(), labels, reduction="sum").item()
            correct += (probs.argmax(1) == labels).sum().item()
            count += len(labels)
    assert summary["val.loss"] == pytest.approx(loss / count, rel=1e-5)
    assert summary["val.top1"] == pytest.approx(100 * correct / count)


def test_classify_with_tta_prints_the_usual_top5_of_the_averaged_softmax(generated, weights, capsys):
    image = sorted((generated / "val").rglob("*.jpg"))[0]
    assert classify(["--arch", "efficientnet-b0", "--num_classes", "3", "--pretrained-from-file", str(weights),
                     "--image", str(image), "--image-size", str(SIZE), "--cpu", "--precision", "FP32",
                     "--tta", "flip"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 4  # 3 classes
    printed = {LINE.match(line)["name"]: float(LINE.match(line)["prob"]) for line in lines[1:]}
    model = efficientnet_b0(num_classes=3, pretrained_from_file=str(weights)).eval()
    batch = Normalizer(CPU)(load_image(image, SIZE).unsqueeze(0))
    with torch.no_grad():
        probs = _mean_of_two_passes(model, batch)[0]
    assert printed == {str(i): round(100 * p, 1) for i, p in enumerate(probs.tolist())}


def test_eval_crop_pct_geometry_default_unchanged_and_backends_agree(generated):
    assert val_resize_size(224) == 256 and val_resize_size(224, 224 / 256) == 256
    assert val_resize_size(224, 0.875) == 256 and val_resize_size(32, 0.875) == 37 and val_resize_size(32, 1.0) == 32
    path = sorted((generated / "val").rglob("*.jpg"))[0]
    picture = load_rgb(str(path))
    expected = T.Compose([T.Resize(40, antialias=True), T.CenterCrop(SIZE), T.PILToTensor()])(picture)
    assert torch.equal(val_transform(SIZE, crop_pct=0.8)(picture), expected)
    assert torch.equal(val_transform(SIZE)(picture), val_transform(SIZE, crop_pct=SIZE / (SIZE + 32))(picture))

    batches = {}
    for backend in ("pytorch", "dali-cpu"):
        loader = build_val_loader(backend, str(generated), image_size=SIZE, crop_pct=0.8, batch_size=15, ctx=CPU,
                                  num_classes=3, workers=1, seed=0)
        loader.set_epoch(0)
        batches[backend] = next(iter(loader))
        loader.close()
    (a, labels_a), (b, labels_b) = batches["pytorch"], batches["dali-cpu"]
    assert torch.equal(labels_a, labels_b) and a.shape == b.shape == (15, 3, SIZE, SIZE)
    # Same crop, resizers of two libraries: within a few levels of 255 on average (normalised units here).
    assert (a - b).abs().mean() < 0.1
    # and far from the default geometry's crop of the same images
    default = build_val_loader("pytorch", str(generated), image_size=SIZE, batch_size=15, ctx=CPU, num_classes=3,
                               workers=0, seed=0)
    default.set_epoch(0)
    assert (next(iter(default))[0] - a).abs().mean() > 3 * (a - b).abs().mean()


@pytest.mark.slow
def test_eval_sizes_prints_one_row_per_size_and_crop_pct(generated, weights):
    result = prefork.run([sys.executable, str(ROOT / "scripts" / "eval_sizes.py"), str(generated),
                          "--arch", "efficientnet-b0", "--num_classes", "3", "--pretrained-from-file", str(weights),
                          "--sizes", "32", "40", "--crop-pcts", "0.875", "1.0", "-b", "8", "-j", "0",
                          "--device", "cpu"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| size | crop pct | top1 | top5 | img/s |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[0], row[1]) for row in rows] == [("32", "0.875"), ("32", "1.000"), ("40", "0.875"), ("40", "1.000")]
    for row in rows:
        assert 0 <= float(row[2]) <= float(row[3]) <= 100 and float(row[4]) > 0
    # Each setting is announced on stderr as it finishes (the table comes at the end).
    assert [line.split(": top1")[0] for line in result.stderr.splitlines() if line.startswith("eval_sizes.py: ")] \
        == ["eval_sizes.py: 1/4: size 32, crop pct 0.875", "eval_sizes.py: 2/4: size 32, crop pct 1.000",
            "eval_sizes.py: 3/4: size 40, crop pct 0.875", "eval_sizes.py: 4/4: size 40, crop pct 1.000"]

    default = prefork.run([sys.executable, str(ROOT / "scripts" / "eval_sizes.py"), str(generated),
                           "--arch", "efficientnet-b0", "--num_classes", "3", "--sizes", "32", "-b", "8", "-j", "0",
                           "--device", "cpu", "--prof", "1"], cwd=ROOT)
    assert default.returncode == 0 and "random weights" in default.stderr
    assert default.stdout.strip().splitlines()[2].startswith("| 32 | 0.500 |")  # 32 / (32 + 32)

    bad = prefork.run([sys.executable, str(ROOT / "scripts" / "eval_sizes.py"), str(generated), "--arch",
                       "efficientnet-b0", "--sizes", "32", "--crop-pcts", "1.5"], cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("eval_sizes.py: error: argument --crop-pcts")


@pytest.mark.parametrize("argv, flag", [(["--eval-crop-pct", "0"], "--eval-crop-pct"),
                                        (["--eval-crop-pct", "1.5"], "--eval-crop-pct"),
                                        (["--tta", "crop"], "--tta"), (["--swa-lr", "0"], "--swa-lr"),
                                        (["--swa-start", "-1"], "--swa-start")])
def test_out_of_range_evaluation_and_averaging_flags_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["/data", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"main.py: error: argument {flag}")
    assert len(err.strip().splitlines()) == 1
