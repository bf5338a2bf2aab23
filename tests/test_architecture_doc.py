"""ARCHITECTURE.md against the code: its paths exist, its names resolve, its registration lines are the code's, every
registry is named, and its optimizer and LR schedule examples work once registered (then are removed again)."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from image_classification.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "image_classification"
DOC = (ROOT / "ARCHITECTURE.md").read_text()
# Inline code outside the fenced blocks: the fenced examples name modules that adding a feature would create.
PROSE = re.sub(r"^```.*?^```", "", DOC, flags=re.DOTALL | re.MULTILINE)
SPANS = sorted(set(re.findall(r"`([^`\n]+)`", PROSE)))

# A span is a repository path when it has a slash or one of these endings; other file names on the page (a run's
# config.yaml) are not the repository's.
PATH_ENDINGS = (".py", ".md", ".sh", ".yml", ".toml", ".json")
FILE_EXTENSIONS = {"py", "md", "sh", "yml", "yaml", "toml", "json", "txt", "tar"}
# Where a bare file name may live (not the whole checkout, which may hold .venv or datasets).
SEARCHED = ("image_classification", "tests", "scripts", "bench", "efficientnet")
PACKAGE_CHILDREN = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                              if (p / "__init__.py").is_file()}
# The registries the page walks through.
NAMED_REGISTRIES = ("OPTIMIZERS", "LR_SCHEDULES", "ONNX_ENGINE_CLASSES", "FEATURES", "FORMATS", "DATA_BACKENDS",
                    "POLICIES")


def is_path(span: str) -> bool:
    return (re.fullmatch(r"[\w.\-/]+", span) is not None and not span.startswith(("-", "."))
            and ("/" in span or span.endswith(PATH_ENDINGS)))


def path_exists(span: str) -> bool:
    """At the root or in the package; a bare file name anywhere in the package, tests, scripts or benchmarks."""
    relative = span.rstrip("/")
    if "/" in relative:
        return (ROOT / relative).exists() or (PACKAGE / relative).exists()
    return (ROOT / relative).exists() or any(any((ROOT / folder).rglob(relative)) for folder in SEARCHED)


def python_names() -> list[str]:
    """Dotted names in the package: image_classification.x.y, or x.y where x is one of its modules or subpackages."""
    names = []
    for span in SPANS:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+(:\w+)?", span) or span.rsplit(".", 1)[-1] in FILE_EXTENSIONS:
            continue
        if span.startswith("image_classification.") or span.split(".")[0] in PACKAGE_CHILDREN:
            names.append(span)
    return names


def resolve(name: str) -> object:
    """The object a dotted name (with an optional ":attribute") names, read relative to the package."""
    dotted, _, attribute = name.partition(":")
    modules = dotted.split(".")
    if modules[0] != "image_classification":
        modules.insert(0, "image_classification")
    obj = importlib.import_module(modules[0])
    for index, part in enumerate(modules[1:] + ([attribute] if attribute else []), start=1):
        submodule = ".".join(modules[:index + 1])
        if index < len(modules) and hasattr(obj, "__path__") and importlib.util.find_spec(submodule) is not None:
            obj = importlib.import_module(submodule)
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        elif dataclasses.is_dataclass(obj) and part in {field.name for field in dataclasses.fields(obj)}:
            obj = None  # a dataclass field without a class-level default (Config.optim, ...)
        else:
            raise AttributeError(f"{name}: no {part!r} there")
    return obj


def package_registries() -> dict[str, tuple[str, Path]]:
    """Every module-level `NAME = Registry(...)` of the package: NAME -> (module, file)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for name in re.findall(r"^(\w+)\s*(?::[^=\n]+)?=\s*Registry\(", path.read_text(), flags=re.MULTILINE):
            found[name] = (module, path)
    return found


def example(lead: str) -> str:
    """The first Python block after the paragraph that begins with `lead`."""
    block = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE).search(DOC, DOC.index(lead))
    assert block is not None, f"no example after {lead}"
    return block.group(1)


def test_the_paths_it_names_exist():
    paths = [span for span in SPANS if is_path(span)]
    assert len(paths) > 40  # the page's map of the package, not an empty match
    assert [span for span in paths if not path_exists(span)] == []


def test_the_python_names_it_mentions_resolve():
    names = python_names()
    assert len(names) > 40
    failures = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            failures.append(f"{name}: {err}")
    assert failures == []


def test_every_registry_is_on_the_page_and_the_ones_it_names_are_registries():
    registries = package_registries()
    assert set(NAMED_REGISTRIES) <= registries.keys()
    assert [name for name in registries if not re.search(rf"\b{name}\b", DOC)] == []
    for name, (module, _) in registries.items():
        assert isinstance(getattr(importlib.import_module(module), name), Registry), name


def test_the_registration_lines_it_quotes_are_the_codes():
    registries = package_registries()
    quoted = [span for span in SPANS if re.match(r"@?\w+\.register\(", span)]
    assert any(span.startswith("@OPTIMIZERS.register(") for span in quoted)  # LAMB's, as the page promises
    for span in quoted:
        _, path = registries[re.match(r"@?(\w+)", span).group(1)]
        assert span in path.read_text(), f"{span} is not in {path.relative_to(ROOT)}"


def test_it_gives_the_order_of_the_training_features():
    from image_classification.features import FEATURES
    assert " → ".join(FEATURES.names()) in DOC


class BatchNormNet(nn.Module):
    """A conv and a BatchNorm: the two parameter groups of the reference (BatchNorm without weight decay)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def register_example(monkeypatch: pytest.MonkeyPatch, module, registry: Registry, lead: str) -> str:
    """Run the page's example in `module`'s namespace with `registry` restored when `monkeypatch` undoes; the name
    it registered."""
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    before = set(registry.names())
    # The page's code runs as if written in the module, the registration decorator included.
    exec(compile(example(lead), "ARCHITECTURE.md", "exec"), dict(vars(module)))
    added = [name for name in registry.names() if name not in before]
    assert len(added) == 1, added
    return added[0]


def choices(parser, dest: str) -> tuple:
    return next(action for action in parser._actions if action.dest == dest).choices


def test_the_optimizer_example_becomes_a_choice_of_optimizer_and_builds_a_jobs_optimizer(monkeypatch):
    from image_classification import arguments
    from image_classification.train import optimizers
    with monkeypatch.context() as patch:
        name = register_example(patch, optimizers, optimizers.OPTIMIZERS, "**An optimizer**")
        parser = arguments.build_parser()
        assert name in choices(parser, "optimizer")
        assert f"lamb,{name}}}" in parser.format_help()  # -h lists it after the others
        config = arguments.parse_config(["--data-backend", "synthetic", "--optimizer", name, "--lr", "0.01"])
        assert config.optim.optimizer == name
        model = BatchNormNet()
        optimizer = optimizers.job_optimizer(model, config)
        assert type(optimizer) is type(optimizers.OPTIMIZERS.get(name)([{"params": [nn.Parameter(torch.ones(1))]}],
                                                                        config.optim))
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, config.optim.weight_decay]
        before = model.conv.weight.detach().clone()
        model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
        optimizer.step()
        assert not torch.equal(model.conv.weight, before)
    assert name not in optimizers.OPTIMIZERS
    assert name not in choices(arguments.build_parser(), "optimizer")


def test_the_lr_schedule_example_becomes_a_choice_of_lr_schedule_after_the_warmup(monkeypatch):
    from image_classification import arguments
    from image_classification.train import schedules
    with monkeypatch.context() as patch:
        name = register_example(patch, schedules, schedules.LR_SCHEDULES, "**An LR schedule**")
        assert name in choices(arguments.build_parser(), "lr_schedule")
        config = arguments.parse_config(["--data-backend", "synthetic", "--lr-schedule", name, "--lr", "0.1",
                                         "--warmup", "2", "--epochs", "6"])
        lrs = [schedules.LRSchedule.from_config(config).lr_of(epoch) for epoch in range(6)]
        assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert name not in schedules.LR_SCHEDULES
