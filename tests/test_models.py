"""The model zoo: registry, reference state-dict layout, numerics, stochastic depth and weight loading."""
from __future__ import annotations

import functools
import http.server
import json
import re
import threading
from pathlib import Path

import pytest
import torch

from image_classification.models import WeightsError, available_models, get_entry
from image_classification.models.weights import load_file

# NVIDIA's state-dict keys/shapes and parameter counts per arch (copied from the project spec), kept with the
# tests so that any clone checks against them.
SPEC = Path(__file__).resolve().parent / "data"
MANIFEST = json.loads((SPEC / "state_dict_manifest.json").read_text())
PARAM_COUNTS = json.loads((SPEC / "param_counts.json").read_text())
FLOAT_ARCHS = [name for name in available_models() if not name.startswith("efficientnet-quant-")]


def small_input(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def built(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_entry(arch)(num_classes=10)


# b0 and the first Lite stay in the fast tier; the larger ones (up to 18 s each on 2 cores) run with the slow tier.
FAST_ARCHS = ("efficientnet-b0", "efficientnet-lite0")


@pytest.mark.parametrize("arch", [arch if arch in FAST_ARCHS else pytest.param(arch, marks=pytest.mark.slow)
                                  for arch in FLOAT_ARCHS])
def test_forward_backward(arch):
    model = built(arch).train()
    out = model(small_input())
    assert out.shape == (2, 10)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", sorted(MANIFEST))
def test_state_dict_matches_reference_manifest(arch):
    model = get_entry(arch)()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, shape) for k, shape in MANIFEST[arch]]


@pytest.mark.parametrize("arch", sorted(PARAM_COUNTS))
def test_parameter_counts_match_reference(arch):
    model = get_entry(arch)()
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[arch]


def test_manifest_is_present():
    # Without the spec files the two tests above would silently test nothing.
    assert MANIFEST and PARAM_COUNTS


@pytest.mark.parametrize("arch", ["efficientnet-b0", "efficientnet-widese-b0", "efficientnet-b4"])
def test_reference_hyperparameters(arch):
    model = get_entry(arch)()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.momentum == 0.01 and bn.eps == 1e-3 for bn in bns)
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    expected = {"efficientnet-b0": (0.2, 224), "efficientnet-widese-b0": (0.2, 224), "efficientnet-b4": (0.4, 380)}
    assert (model.classifier.dropout.p, model.arch.default_image_size) == expected[arch]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    stem_std = model.stem.conv.weight.std().item()
    assert stem_std == pytest.approx((2.0 / 27) ** 0.5, rel=0.2)  # kaiming fan_in, relu gain


def test_survival_prob_decays_linearly_over_blocks():
    model = get_entry("efficientnet-b4")()
    blocks = [b for stage in model.layers for b in stage]
    probs = [b.survival_prob for b in blocks]
    assert probs[0] == 1.0 and probs == sorted(probs, reverse=True)
    assert probs[-1] == pytest.approx(1 - 0.2 * (len(blocks) - 1) / len(blocks))


def test_nhwc_matches_nchw():
    model = built("efficientnet-b0").eval()
    x = small_input()
    with torch.no_grad():
        nchw = model(x)
        nhwc = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-5)


def test_eval_is_deterministic():
    model = built("efficientnet-b0").eval()
    x = small_input()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_stochastic_depth_drops_whole_samples_in_sample_mode():
    model = get_entry("efficientnet-b0")(survival_prob=0.5, dropout=0.0, stochastic_depth_mode="sample")
    block = model.layers[1].block1  # a residual block
    assert block.residual and block.survival_prob < 1.0
    block.train()
    x = torch.randn(64, block.proj.conv.out_channels, 8, 8)
    torch.manual_seed(0)
    branch = block.proj(block.se(block.depsep(block.expand(x))))
    torch.manual_seed(0)
    out = block(x)
    per_sample = (out - x).flatten(1)
    kept = [torch.allclose(d, branch[i].flatten() / block.survival_prob, atol=1e-5) for i, d in enumerate(per_sample)]
    dropped = [bool((d == 0).all()) for d in per_sample]
    assert all(k or d for k, d in zip(kept, dropped))
    assert 0 < sum(dropped) < 64
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + block.proj(block.se(block.depsep(block.expand(x)))))


def test_stochastic_depth_keeps_or_drops_the_whole_batch_by_default():
    """The reference's mode: one draw per forward for the whole batch, the kept branch scaled by 1/survival."""
    model = get_entry("efficientnet-b0")(survival_prob=0.5, dropout=0.0)
    block = model.layers[1].block1
    block.train()
    x = torch.randn(16, block.proj.conv.out_channels, 8, 8)
    with torch.no_grad():
        branch = block.proj(block.se(block.depsep(block.expand(x))))
        outcomes = set()
        torch.manual_seed(0)
        for _ in range(20):
            out = block(x)
            if torch.equal(out, x):
                outcomes.add("dropped")
            else:
                torch.testing.assert_close(out, x + branch / block.survival_prob)
                outcomes.add("kept")
    assert outcomes == {"dropped", "kept"}


def test_survival_prob_one_is_identity_in_training():
    model = get_entry("efficientnet-b0")(survival_prob=1.0, dropout=0.0).train()
    x = small_input()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    torch.testing.assert_close(a, b)


def test_trt_se_matches_linear_se_with_reshaped_weights():
    linear = built("efficientnet-b0").eval()
    trt = get_entry("efficientnet-b0")(num_classes=10, trt=True).eval()
    assert trt.layers[0].block0.se.squeeze.weight.dim() == 4
    trt.load_state_dict({k: v.reshape(trt.state_dict()[k].shape) for k, v in linear.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(trt(small_input()), linear(small_input()), rtol=1e-4, atol=1e-5)


def test_model_flags_parse_both_spellings():
    parser = get_entry("efficientnet-b0").parser()
    args = parser.parse_args(["--num-classes", "7", "--trt", "True", "--bn_momentum", "0.1"])
    assert (args.num_classes, args.trt, args.bn_momentum, args.dropout) == (7, True, 0.1, 0.2)
    assert parser.parse_args(["--num_classes", "3", "--trt"]).trt is True
    assert get_entry("efficientnet-b4").parser().parse_args([]).survival_prob == 0.8


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="efficientnet-b0"):
        get_entry("efficientnet-b9")


def test_api_exposes_entry_points():
    import image_classification.models as models

    for name in ("efficientnet_b0", "efficientnet_b4", "efficientnet_widese_b0", "efficientnet_widese_b4",
                 "efficientnet_b7", "efficientnet_widese_b7"):
        assert callable(getattr(models, name))
    assert models.efficientnet_b0 is available_models()["efficientnet-b0"]
    assert models.efficientnet_b0.parser().parse_args([]).num_classes == 1000


def ngc_style(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of NVIDIA's 20.12.0 files: `module.` prefix and `layer<N>.` stage names."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
        renamed[f"module.{key}"] = value.clone()
    return renamed


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """Serve tmp_path/served over HTTP on 127.0.0.1 and point the torch hub cache at tmp_path/hub."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("trt", [False, True])
def test_pretrained_downloads_and_remaps_ngc_file(weights_server, monkeypatch, tmp_path, trt):
    root, base = weights_server
    source = built("efficientnet-b0")
    reference = ngc_style(source.state_dict())
    assert any(k.startswith("module.layer1.") for k in reference)
    assert reference["module.layer1.block0.se.squeeze.weight"].dim() == 2
    torch.save(reference, root / "nvidia_efficientnet-b0_210412.pth")
    entry = get_entry("efficientnet-b0")
    monkeypatch.setattr(entry, "pretrained_url", f"{base}/nvidia_efficientnet-b0_210412.pth")
    model = entry(pretrained=True, num_classes=10, trt=trt).eval()
    assert (tmp_path / "hub" / "hub" / "checkpoints" / "nvidia_efficientnet-b0_210412.pth").is_file()
    with torch.no_grad():
        torch.testing.assert_close(model(small_input()), source.eval()(small_input()), rtol=1e-4, atol=1e-5)


def test_pickled_object_checkpoint_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": built("efficientnet-b0").state_dict(), "payload": Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_file(path)
    with pytest.raises(WeightsError, match="refused"):
        get_entry("efficientnet-b0")(pretrained_from_file=str(path), num_classes=10)


@pytest.mark.slow
def test_training_checkpoint_loads_and_misfits_are_explained(tmp_path):
    source = built("efficientnet-b0")
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "best_prec1": 12.5, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": {}}, ckpt)
    model = get_entry("efficientnet-b0")(pretrained_from_file=str(ckpt), num_classes=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(small_input()), source.eval()(small_input()))

    with pytest.raises(WeightsError, match="--reset-classifier"):
        get_entry("efficientnet-b0")(pretrained_from_file=str(ckpt), num_classes=5)
    tuned = get_entry("efficientnet-b0")(pretrained_from_file=str(ckpt), num_classes=5, reset_classifier=True)
    assert tuned.classifier.fc.out_features == 5
    torch.testing.assert_close(tuned.stem.conv.weight, source.stem.conv.weight)

    with pytest.raises(WeightsError, match=r"missing keys .*\n.*unexpected keys|shape of"):
        get_entry("efficientnet-widese-b0")(pretrained_from_file=str(ckpt), num_classes=10)


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="broken.pth"):
        load_file(broken)
    with pytest.raises(WeightsError, match="no such file"):
        load_file(tmp_path / "absent.pth")


# EfficientNetV2 member: (parameters at 1000 classes, stem channels, blocks per stage, last stage channels,
# train / eval size, dropout). The paper's hand-built tables; the counts are those of torchvision's
# efficientnet_v2_<member> (and timm's tf_efficientnetv2_<member>).
V2_LAYOUTS = {
    "s": (21_458_488, 24, [2, 4, 4, 6, 9, 15], 256, (300, 384), 0.2),
    "m": (54_139_356, 24, [3, 5, 5, 7, 14, 18, 5], 512, (384, 480), 0.3),
    "l": (118_515_272, 32, [4, 7, 7, 10, 19, 25, 7], 640, (384, 480), 0.4),
}


# Module scope: pytest runs every test of one member before building the next, so L is built once.
@pytest.fixture(scope="module", params=sorted(V2_LAYOUTS))
def v2_member(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def v2_model(v2_member) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_entry(f"efficientnet-v2-{v2_member}")().eval()


@pytest.fixture(scope="module")
def torchvision_v2_model(v2_member) -> torch.nn.Module:
    models = pytest.importorskip("torchvision.models")
    return getattr(models, f"efficientnet_v2_{v2_member}")(weights=None).eval()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def feature_shapes(blocks, size: int = 65) -> list[tuple[int, ...]]:
    """Output shape after each block applied in sequence to one size×size image."""
    x, shapes = small_input(batch=1, size=size), []
    with torch.no_grad():
        for block in blocks:
            x = block(x)
            shapes.append(tuple(x.shape))
    return shapes


def test_efficientnet_v2_matches_the_paper_layout(v2_member, v2_model):
    count, stem, repeats, last_stage, sizes, dropout = V2_LAYOUTS[v2_member]
    model = v2_model
    assert num_parameters(model) == count
    assert (model.arch.default_image_size, model.arch.default_eval_image_size) == sizes
    assert model.stem.conv.out_channels == stem and model.features.conv.out_channels == 1280
    assert [len(stage) for stage in model.layers] == repeats
    assert model.layers[-1][-1].proj.conv.out_channels == last_stage
    assert model.classifier.dropout.p == dropout
    assert get_entry(f"efficientnet-v2-{v2_member}").parser().parse_args([]).survival_prob == 0.8
    for stage, spec in zip(model.layers, model.arch.stages):
        for block in stage:
            depthwise = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
            assert bool(depthwise) != spec.fused  # fused blocks have no depthwise conv, MBConv blocks one
            assert (block.se is not None) != spec.fused


def test_efficientnet_v2_parameter_count_equals_torchvision(v2_model, torchvision_v2_model):
    assert num_parameters(v2_model) == num_parameters(torchvision_v2_model)


@pytest.mark.slow
def test_efficientnet_v2_stage_resolutions_equal_torchvision(v2_model, torchvision_v2_model):
    # torchvision's `features` is [stem, stage 1 … stage N, head conv], ours stem, layers, features. An odd
    # input size makes every stride-2 stage round, so a stride or padding placed differently would show.
    ours = feature_shapes([v2_model.stem, *v2_model.layers, v2_model.features])
    assert ours == feature_shapes(torchvision_v2_model.features)


def test_v1_eval_size_defaults_to_train_size():
    arch = get_entry("efficientnet-b4")().arch
    assert arch.default_eval_image_size == arch.default_image_size == 380
