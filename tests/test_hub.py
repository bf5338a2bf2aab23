"""hubconf.py: torch.hub entry points for every registered arch, loaded from this checkout."""
from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from image_classification.models import available_models

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_HUB = ("nvidia_efficientnet_b0", "nvidia_efficientnet_b4", "nvidia_efficientnet_widese_b0",
                 "nvidia_efficientnet_widese_b4")


@pytest.fixture(scope="module")
def hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dependencies_and_entry_names(hubconf):
    tree = ast.parse((ROOT / "hubconf.py").read_text())
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "dependencies"}
    assert assigned == {"dependencies": ["torch"]}
    expected = {"nvidia_" + name.replace("-", "_") for name in available_models()}
    assert set(REFERENCE_HUB) <= expected
    assert expected <= {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    # pretrained defaults to True where NVIDIA published weights, as the reference's hub did, and where a weights
    # package ships them (EfficientNet-Lite0).
    for name in expected:
        default = inspect.signature(getattr(hubconf, name)).parameters["pretrained"].default
        arch = name[len("nvidia_"):]
        assert default == available_models()[next(a for a in available_models()
                                                   if a.replace("-", "_") == arch)].has_pretrained
    assert "nvidia_efficientnet_lite0" in expected and "nvidia_efficientnet_quant_lite4" in expected


@pytest.mark.parametrize("name,params", [("nvidia_efficientnet_b0", 5_288_548),
                                         ("nvidia_efficientnet_widese_b0", 8_423_848)])
def test_hub_load_local(name, params):
    model = torch.hub.load(str(ROOT), name, source="local", pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == params
    model = torch.hub.load(str(ROOT), name, source="local", pretrained=False, num_classes=3, trt=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_pretrained_without_published_weights_is_an_error():
    with pytest.raises(ValueError, match="no published NGC weights"):
        torch.hub.load(str(ROOT), "nvidia_efficientnet_b1", source="local", pretrained=True)


@pytest.fixture
def image_server(tmp_path):
    """A JPEG in tmp_path/served, served over HTTP on 127.0.0.1."""
    import functools
    import http.server
    import threading
    from PIL import Image
    root = tmp_path / "served"
    root.mkdir()
    pixels = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (240, 320, 3), generator=pixels, dtype=torch.uint8).numpy()).save(
        root / "dog.jpg")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root / "dog.jpg", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_processing_utils_as_nvidias_hub_example_uses_them(image_server, capsys):
    from image_classification.deploy.classify import ImageError, load_image
    local, base = image_server
    utils = torch.hub.load(str(ROOT), "nvidia_convnets_processing_utils", source="local")
    model = torch.hub.load(str(ROOT), "nvidia_efficientnet_b0", source="local", pretrained=False).eval()
    uris = [str(local), f"{base}/dog.jpg"]
    batch = torch.cat([utils.prepare_input_from_uri(uri) for uri in uris])
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(batch[0], batch[1])  # the download is the same picture
    # The example's preprocessing: short side 256, centre crop 224, ImageNet mean and std on [0, 1] pixels.
    expected = (load_image(local, 224).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(batch[0], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        output = torch.nn.functional.softmax(model(batch), dim=1)
    results = utils.pick_n_best(predictions=output, n=5)
    assert len(results) == 2 and all(len(r) == 5 for r in results)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("sample 0: [(") and printed[1].startswith("sample 1: [(")

    chosen = torch.zeros(1, 1000)
    chosen[0, 687], chosen[0, 3] = 0.75, 0.25
    assert utils.pick_n_best(chosen, n=2) == [[("organ, pipe organ", "75.0%"),
                                               ("tiger shark, Galeocerdo cuvieri", "25.0%")]]
    with pytest.raises(ImageError, match=f"{base}/missing.jpg: download failed"):
        utils.prepare_input_from_uri(f"{base}/missing.jpg")
