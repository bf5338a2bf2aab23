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
    # pretrained defaults to True where NVIDIA published weights, as the reference's hub did.
    for name in expected:
        default = inspect.signature(getattr(hubconf, name)).parameters["pretrained"].default
        arch = name[len("nvidia_"):]
        assert default == (available_models()[next(a for a in available_models()
                                                    if a.replace("-", "_") == arch)].pretrained_url is not None)


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
