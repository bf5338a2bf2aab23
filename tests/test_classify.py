"""classify.py: the reference's output format, validation preprocessing, class names, and errors per image."""
from __future__ import annotations

import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prefork
from image_classification.context import create_context
from image_classification.data import build_val_loader
from image_classification.data.loader import Normalizer
from image_classification.deploy.classify import ImageError, class_names, imagenet_class_names, load_image, main
from image_classification.models import efficientnet_b0, efficientnet_widese_b0, get_entry

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
LINE = re.compile(r"^(?P<name>.+): (?P<prob>\d+\.\d)%$")


def _image(path: Path, seed: int, size=(61, 47), mode="RGB") -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    torch.manual_seed(0)
    model = efficientnet_b0(num_classes=10)
    # Larger logits than a fresh init gives, so that the top-5 probabilities differ visibly.
    model.classifier.fc.weight.data.mul_(40)
    torch.save(model.state_dict(), root / "b0_10.pth")
    torch.save(efficientnet_widese_b0(num_classes=10).state_dict(), root / "widese_10.pth")
    names = [f"class_{i:02d}" for i in range(10)]
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    for split in ("train", "val"):
        (root / "data" / split / "cls0").mkdir(parents=True)
    _image(root / "data" / "val" / "cls0" / "a.png", seed=1)
    _image(root / "data" / "train" / "cls0" / "a.png", seed=1)
    _image(root / "gray.jpg", seed=2, size=(40, 80), mode="L")
    (root / "text.jpg").write_text("not an image")
    return root


def _blocks(stdout: str) -> list[list[str]]:
    blocks, current = [], []
    for line in stdout.splitlines():
        if LINE.match(line) and current:
            current.append(line)
        else:
            current = [line]
            blocks.append(current)
    return blocks


def _run(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_format_names_file_and_validation_preprocessing(files, capsys):
    image = files / "data" / "val" / "cls0" / "a.png"
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file", str(files / "b0_10.pth"),
                                   "--num_classes", "10", "--class-names", str(files / "classes.txt"),
                                   "--image", str(image), str(files / "gray.jpg"), "--image-size", str(SIZE),
                                   "--precision", "FP32", "--cpu"])
    assert code == 0, err
    blocks = _blocks(out)
    assert [b[0] for b in blocks] == [str(image), str(files / "gray.jpg")]
    for block in blocks:
        assert len(block) == 6
        matches = [LINE.match(line) for line in block[1:]]
        assert all(m and m["name"].startswith("class_") for m in matches), block
        probs = [float(m["prob"]) for m in matches]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 100.05

    # The printed top-5 is the softmax of what the validation loader feeds the same model.
    ctx = create_context(device="cpu")
    loader = build_val_loader("pytorch", str(files / "data"), image_size=SIZE, batch_size=1, ctx=ctx, workers=0,
                              num_classes=1)
    images, _ = next(iter(loader))
    model = efficientnet_b0(num_classes=10, pretrained_from_file=str(files / "b0_10.pth")).eval()
    with torch.no_grad():
        probs = torch.softmax(model(images), dim=1)[0]
    values, indices = probs.topk(5)
    expected = [f"class_{i:02d}: {100 * v:.1f}%" for v, i in zip(values.tolist(), indices.tolist())]
    assert blocks[0][1:] == expected


def test_imagenet_names_by_default_and_indices_for_other_class_counts(files, tmp_path, capsys):
    names = imagenet_class_names()
    # The reference's full names (LOC_synset_mapping.json), duplicates of different synsets included.
    assert len(names) == 1000
    assert {i: names[i] for i in (0, 3, 134, 517, 638, 639, 687, 916, 999)} == {
        0: "tench, Tinca tinca", 3: "tiger shark, Galeocerdo cuvieri", 134: "crane", 517: "crane", 638: "maillot",
        639: "maillot, tank suit", 687: "organ, pipe organ", 916: "web site, website, internet site, site",
        999: "toilet tissue, toilet paper, bathroom tissue"}
    assert class_names(1000) == names
    assert class_names(7) == [str(i) for i in range(7)]
    image = str(files / "gray.jpg")
    # Default precision is AMP: bf16 autocast on the CPU.
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--image", image, "--image-size", str(SIZE)])
    assert code == 0 and "random weights" in err
    lines = out.splitlines()
    assert lines[0] == image and len(lines) == 6
    assert all(LINE.match(line)["name"] in names for line in lines[1:])
    # Plain weights without a classes.txt beside them (`files` has one, which names the classes: see below).
    shutil.copy(files / "b0_10.pth", tmp_path / "b0_10.pth")
    code, out, _ = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file", str(tmp_path / "b0_10.pth"),
                                 "--num-classes", "10", "--image", image, "--image-size", str(SIZE), "--cpu"])
    assert code == 0
    assert all(LINE.match(line)["name"] in {str(i) for i in range(10)} for line in out.splitlines()[1:])


def test_the_checkpoints_class_names_are_printed_and_a_names_file_that_disagrees_is_warned_about(files, tmp_path,
                                                                                                 capsys):
    names = [f"kind_{i}" for i in range(10)]
    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": torch.load(files / "b0_10.pth", weights_only=True), "arch": "efficientnet-b0",
                "classes": names}, checkpoint)
    argv = ["--arch", "efficientnet-b0", "--pretrained-from-file", str(checkpoint), "--num_classes", "10",
            "--image", str(files / "gray.jpg"), "--image-size", str(SIZE), "--cpu", "--precision", "FP32"]
    code, out, err = _run(capsys, argv)
    assert code == 0 and err == ""
    assert all(LINE.match(line)["name"] in names for line in out.splitlines()[1:])
    code, out, err = _run(capsys, [*argv, "--class-names", str(files / "classes.txt")])
    assert code == 0
    assert err.strip() == (f"classify.py: warning: --class-names {files / 'classes.txt'} is not the class list the "
                           "checkpoint was trained on (class 0 is 'class_00', in the checkpoint 'kind_0'); printing "
                           "the file's names")
    assert all(LINE.match(line)["name"].startswith("class_") for line in out.splitlines()[1:])


def test_weights_of_another_arch_recorded_in_the_checkpoint_are_named_in_one_line(files, tmp_path, capsys):
    checkpoint = tmp_path / "widese.pth.tar"
    torch.save({"state_dict": torch.load(files / "widese_10.pth", weights_only=True),
                "arch": "efficientnet-widese-b0"}, checkpoint)
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file", str(checkpoint),
                                   "--num_classes", "10", "--image", str(files / "gray.jpg")])
    assert code == 1 and out == ""
    assert err.strip() == (f"classify.py: error: {checkpoint}: holds efficientnet-widese-b0 weights (as the checkpoint "
                           "records), the model is efficientnet-b0; use --arch efficientnet-widese-b0")


def test_a_names_file_that_is_not_utf8_is_one_line(files, tmp_path, capsys):
    names = tmp_path / "latin1.txt"
    names.write_bytes("".join(f"cl\xe4ss {i}\n" for i in range(10)).encode("latin-1"))
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file", str(files / "b0_10.pth"),
                                   "--num_classes", "10", "--class-names", str(names), "--image",
                                   str(files / "gray.jpg")])
    assert code == 1 and out == ""
    assert err.strip() == (f"classify.py: error: --class-names {names}: not UTF-8 text (byte 0xe4 at offset 2); give "
                           "one class name per line")


def test_bad_images_are_reported_and_the_others_still_classified(files, capsys):
    good = str(files / "gray.jpg")
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--image", str(files / "missing.png"),
                                   str(files / "text.jpg"), good, "--image", str(files), "--image-size", str(SIZE),
                                   "--precision", "FP32"])
    assert code == 1
    assert out.splitlines()[0] == good and len(out.splitlines()) == 6
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"classify.py: error: {files / 'missing.png'}: no such file",
                      f"classify.py: error: {files / 'text.jpg'}: not an image (unrecognised format)",
                      f"classify.py: error: {files}: is a folder, not an image"]


def test_weights_of_another_arch_and_bad_names_file_give_one_line(files, capsys):
    image = str(files / "gray.jpg")
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file",
                                   str(files / "widese_10.pth"), "--num_classes", "10", "--image", image])
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "does not fit" in err and "efficientnet-b0" in err
    code, _, err = _run(capsys, ["--arch", "efficientnet-b0", "--class-names", str(files / "classes.txt"),
                                 "--image", image])
    assert code == 1 and "lists 10 classes, the model has 1000" in err
    with pytest.raises(SystemExit) as exc:
        main(["--arch", "efficientnet-b99", "--image", image])
    assert exc.value.code == 2 and "efficientnet-widese-b4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--arch", "efficientnet-b0", "--image", image, "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_quantized_arch_without_ranges_is_one_line(files, capsys):
    # Float weights into a quantized arch leave its quantizers without ranges: refuse, naming them.
    code, out, err = _run(capsys, ["--arch", "efficientnet-quant-b0", "--pretrained-from-file",
                                   str(files / "b0_10.pth"), "--num_classes", "10", "--image", str(files / "gray.jpg")])
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no ranges (_amax)" in err and "b0_10.pth" in err


@pytest.mark.slow
def test_script_runs_without_traceback(files):
    result = prefork.run([sys.executable, str(ROOT / "classify.py"), "--arch", "efficientnet-b0",
                          "--pretrained-from-file", str(files / "missing.pth"), "--image", str(files / "gray.jpg")],
                         cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "no such file" in result.stderr


def test_efficientnet_v2_s_classifies(files, capsys):
    weights = files / "v2s_10.pth"
    torch.manual_seed(0)
    torch.save(get_entry("efficientnet-v2-s")(num_classes=10).state_dict(), weights)
    code, out, err = _run(capsys, ["--arch", "efficientnet-v2-s", "--pretrained-from-file", str(weights),
                                   "--num_classes", "10", "--image", str(files / "gray.jpg"),
                                   "--image-size", str(SIZE), "--cpu"])
    assert code == 0, err
    [block] = _blocks(out)
    assert block[0] == str(files / "gray.jpg") and all(LINE.match(line) for line in block[1:]) and len(block) == 6


def _bomb_png(path: Path) -> Path:
    """A tiny PNG whose header claims 30000x30000 pixels (Pillow refuses it; nothing large is allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_error_line_and_the_others_still_run(files, capsys):
    bomb = _bomb_png(files / "bomb.png")
    with pytest.raises(ImageError, match=f"^{re.escape(str(bomb))}: too large to decode .*pixels"):
        load_image(bomb, SIZE)
    good = str(files / "gray.jpg")
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--image", str(bomb), good, "--image-size", str(SIZE),
                                   "--precision", "FP32", "--cpu"])
    assert code == 1
    assert out.splitlines()[0] == good and len(out.splitlines()) == 6
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"classify.py: error: {bomb}: too large to decode")


def test_16bit_grayscale_is_scaled_to_8bit(tmp_path):
    # 48 px is S + 32 for S = 16: no resize, the centre crop starts at 16.
    values = (np.arange(48 * 48, dtype=np.int64) * 65535 // (48 * 48 - 1)).reshape(48, 48)
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "ramp16.png")
    image = load_image(tmp_path / "ramp16.png", 16)
    expected = np.round(values[16:32, 16:32] / 257)
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert np.abs(image.numpy().astype(np.float64) - expected[None]).max() <= 1


def test_weights_with_nan_are_refused_naming_file_and_tensor(files, tmp_path, capsys):
    # What a diverged run writes (the reference's QAT lines at toy scale printed "tiger shark: nan%").
    state = torch.load(files / "b0_10.pth", weights_only=True)
    state["classifier.fc.bias"][7] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file", str(weights),
                                   "--num_classes", "10", "--image", str(files / "gray.jpg")])
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"classify.py: error: {weights}: classifier.fc.bias holds NaN or infinite "
                                        "values (the run that wrote these weights diverged); use an earlier checkpoint"]


# --- what a training checkpoint records --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(generated, tmp_path_factory):
    """A training run's workspace: 3 classes at 40 px, validated with crop 0.8 and bicubic resizing."""
    from runs import train
    workspace = tmp_path_factory.mktemp("trained")
    train([str(generated), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", "40",
           "--eval-crop-pct", "0.8", "--interpolation", "bicubic", "-b", "4", "--workers", "0", "--epochs", "1",
           "--lr", "0.01", "--bn_momentum", "0.1", "--seed", "0", "--workspace", str(workspace)])
    return workspace


def test_a_training_checkpoint_alone_gives_arch_class_count_size_crop_and_names(trained, generated, capsys):
    image = generated / "val" / "square" / "square_00001.jpg"
    code, out, err = _run(capsys, ["--pretrained-from-file", str(trained / "model_best.pth.tar"), "--image",
                                   str(image), "--precision", "FP32", "--cpu"])
    assert code == 0 and err == ""
    model = get_entry("efficientnet-b0")(num_classes=3, pretrained_from_file=str(trained / "model_best.pth.tar"))
    batch = load_image(image, 40, "bicubic", 0.8).unsqueeze(0)  # the run's validation geometry
    with torch.no_grad():
        probs = torch.softmax(model.eval()(Normalizer(create_context(device="cpu"))(batch)), dim=1)[0]
    values, indices = probs.topk(3)
    names = ["circle", "square", "triangle"]
    assert out.splitlines() == [str(image)] + [f"{names[i]}: {100 * v:.1f}%" for v, i in zip(values.tolist(),
                                                                                          indices.tolist())]


def test_a_class_count_the_weights_do_not_have_is_cured_by_num_classes(trained, capsys):
    checkpoint = trained / "model_best.pth.tar"
    code, out, err = _run(capsys, ["--pretrained-from-file", str(checkpoint), "--num_classes", "10", "--image",
                                   str(trained / "x.jpg")])
    assert code == 1 and out == ""
    assert err.strip() == (f"classify.py: error: {checkpoint}: the weights score 3 classes, --num_classes is 10; give "
                           "--num_classes 3 or leave it out (the weights' count is the default)")


def test_plain_weights_take_the_names_of_the_classes_txt_beside_them(trained, generated, capsys):
    import checkpoint2model
    weights = trained / "model.pth"
    checkpoint2model.main(["--checkpoint-path", str(trained / "model_best.pth.tar"), "--weight-path", str(weights)])
    capsys.readouterr()
    image = str(generated / "val" / "circle" / "circle_00000.jpg")
    code, out, err = _run(capsys, ["--arch", "efficientnet-b0", "--pretrained-from-file", str(weights), "--image",
                                   image, "--image-size", "40", "--cpu"])
    assert code == 0, err
    assert {LINE.match(line)["name"] for line in out.splitlines()[1:]} == {"circle", "square", "triangle"}
    # Plain weights record no arch: --arch stays required, and says why.
    with pytest.raises(SystemExit) as exc:
        main(["--pretrained-from-file", str(weights), "--image", image])
    assert exc.value.code == 2
    assert "--arch is required unless --pretrained-from-file is a training checkpoint of this suite" in \
        capsys.readouterr().err
