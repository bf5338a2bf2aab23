"""Every command line of the reference README and of efficientnet/ runs, adapted to toy sizes only.

The promise of this suite is that a user of NVIDIA's ConvNets keeps their command lines. The lines below
are copied verbatim from PyTorch/Classification/ConvNets/efficientnet/README.md (release 24.03) and the
recipes are run through bash itself; `adapt` is the only change made to any of them, the same for every
line: placeholders get toy values and sizes shrink (dataset, image size, batch, iterations, processes).
A line that fails here fails for a user too, so none is skipped or marked expected to fail.

About 85 command lines of a second to a quarter of a minute each on 2 CPU cores (about 4 minutes in all), each
forked from tests/prefork.py's server with torchrun's workers; each test has a timeout. Deselect with `--deselect tests/test_reference_commands.py` for a quick run.
"""
from __future__ import annotations

import functools
import http.server
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import prefork
from runs import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "efficientnet"

pytestmark = pytest.mark.timeout(900)  # per test, its session fixtures included; each line has LINE_TIMEOUT

LINE_TIMEOUT = 180
CLASSES = 4  # the toy dataset: 4 classes, 8 training and 4 validation images each, 32 px
IMAGE_SIZE = 32
BATCH = 4
PROF = 2  # iterations per phase (--prof)
PROCESSES = 2  # --nproc_per_node of the README's multi-GPU lines and of the recipes' multiproc.py lines

# --- The reference README's command lines, verbatim. `A|B` alternatives run once each; `<version>` is b0.
# Left out, not being this suite's interface: `git clone`/`cd` (Quick Start 1), the dataset's
# mkdir/tar/find/wget|bash preparation (4, 5), `docker build` and `nvidia-docker run` (6, 7) and the NGC
# downloads `wget`/`unzip` (9, NGC pretrained weights; --pretrained below covers the download).
README_LINES = [
    # Quick Start Guide, 8. Start training
    ("quickstart-train", "bash ./efficientnet/training/AMP/DGXA100_efficientnet-b0_AMP.sh "
                         "<path were to store checkpoints and logs>"),
    # Quick Start Guide, 9. Start inference
    ("quickstart-eval-pretrained", "python ./main.py --arch efficientnet-<version> --evaluate --epochs 1 --pretrained  "
                                   "-b <batch size> <path to imagenet>"),
    ("quickstart-classify-pretrained", "python classify.py --arch efficientnet-<version> --pretrained "
                                       "--precision AMP|FP32 --image <path to JPEG image>"),
    # Advanced / Scripts and sample code
    ("advanced-1gpu-fp32", "python ./main.py --arch efficientnet-<version> --label-smoothing 0.1 <path to imagenet>"),
    ("advanced-1gpu-amp", "python ./main.py --arch efficientnet-<version> --label-smoothing 0.1 --amp "
                          "--static-loss-scale 256 <path to imagenet>"),
    ("advanced-multigpu-fp32", "python ./multiproc.py --nproc_per_node 8 ./main.py --arch efficientnet-<version> "
                               "--label-smoothing 0.1 <path to imagenet>"),
    ("advanced-multigpu-amp", "python ./multiproc.py --nproc_per_node 8 ./main.py --arch efficientnet-<version> "
                              "--label-smoothing 0.1 --amp --static-loss-scale 256 <path to imagenet>"),
    ("advanced-help", "python ./main.py -h"),
    # Advanced / Command-line options
    ("options-help", "python main.py -h"),
    # Advanced / Inference process
    ("inference-eval-resume", "python ./main.py --arch efficientnet-<version> --evaluate --epochs 1 "
                              "--resume <path to checkpoint> -b <batch size> <path to imagenet>"),
    ("inference-checkpoint2model", "python checkpoint2model.py --checkpoint-path <path to checkpoint> "
                                   "--weight-path <path where weights will be stored>"),
    ("inference-classify-file", "python classify.py --arch efficientnet-<version> --pretrained-from-file "
                                "<path to weights from previous step> --precision AMP|FP32 "
                                "--image <path to JPEG image>"),
    ("inference-eval-file", "python ./main.py --arch efficientnet-<version> --evaluate --epochs 1 "
                            "--pretrained-from-file <path to pretrained weights> -b <batch size> <path to imagenet>"),
    # Advanced / Inference process / NGC pretrained weights
    ("ngc-eval-pretrained", "python ./main.py --arch efficientnet-<version> --evaluate --epochs 1 --pretrained "
                            "-b <batch size> <path to imagenet>"),
    ("ngc-classify-pretrained", "python classify.py --arch efficientnet-<version> --pretrained --precision AMP|FP32 "
                                "--image <path to JPEG image>"),
    # Advanced / Quantization process
    ("quant-train", "python ./quant_main.py <path to imagenet> --arch efficientnet-quant-<version> "
                    "--epochs <# of QAT epochs> --pretrained-from-file <path to non-quantized model weights> "
                    "<any other parameters for training such as batch, momentum etc.>"),
    ("quant-resume", "python ./quant_main.py <path to imagenet> --arch efficientnet-quant-<version> "
                     "--resume <path to mid-training checkpoint> ..."),
    ("quant-evaluate", "python ./quant_main.py --arch efficientnet-quant-<version> --evaluate --epochs 1 "
                       "--resume <path to checkpoint> -b <batch size> <path to imagenet>"),
    ("quant-multigpu", "python ./multiproc.py --nproc_per_node 8 ./quant_main.py --arch efficientnet-quant-<version> "
                       "... <path to imagenet>"),
    ("quant-checkpoint2model", "python checkpoint2model.py --checkpoint-path <path to quant checkpoint> "
                               "--weight-path <path where quant weights will be stored>"),
    ("quant-onnx", "python model2onnx.py --arch efficientnet-quant-<version> --pretrained-from-file "
                   "<path to model quant weights> -b <batch size> --trt True"),
    ("quant-classify", "python classify.py --arch efficientnet-quant-<version> --pretrained-from-file "
                       "<path to quant weights> --image <path to JPEG image>"),
    # Performance / Benchmarking / Training performance benchmark (its "multiple GPUs, FP32" line is the
    # 1-GPU line again, without multiproc.py: it runs once)
    ("bench-train-1gpu-fp32", "python ./launch.py --model efficientnet-<version> --precision FP32 "
                              "--mode benchmark_training --platform DGX1V <path to imagenet> "
                              "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-train-1gpu-tf32", "python ./launch.py --model efficientnet-<version> --precision TF32 "
                              "--mode benchmark_training --platform DGXA100 <path to imagenet> "
                              "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-train-1gpu-amp", "python ./launch.py --model efficientnet-<version> --precision AMP "
                             "--mode benchmark_training --platform <DGX1V|DGXA100> <path to imagenet> "
                             "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-train-multigpu-fp32", "python ./launch.py --model efficientnet-<version> --precision FP32 "
                                  "--mode benchmark_training --platform DGX1V <path to imagenet> "
                                  "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-train-multigpu-tf32", "python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-<version> "
                                  "--precision TF32 --mode benchmark_training --platform DGXA100 <path to imagenet> "
                                  "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-train-multigpu-amp", "python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-<version> "
                                 "--precision AMP --mode benchmark_training --platform <DGX1V|DGXA100> "
                                 "<path to imagenet> --raport-file benchmark.json --epochs 1 --prof 100"),
    # Performance / Benchmarking / Inference performance benchmark
    ("bench-inference-fp32", "python ./launch.py --model efficientnet-<version> --precision FP32 "
                             "--mode benchmark_inference --platform DGX1V <path to imagenet> "
                             "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-inference-tf32", "python ./launch.py --model efficientnet-<version> --precision TF32 "
                             "--mode benchmark_inference --platform DGXA100 <path to imagenet> "
                             "--raport-file benchmark.json --epochs 1 --prof 100"),
    ("bench-inference-amp", "python ./launch.py --model efficientnet-<version> --precision AMP "
                            "--mode benchmark_inference --platform <DGX1V|DGXA100> <path to imagenet> "
                            "--raport-file benchmark.json --epochs 1 --prof 100"),
]

ALTERNATIVES = re.compile(r"<([\w-]+(?:\|[\w-]+)+)>|\b([A-Z0-9]+(?:\|[A-Z0-9]+)+)\b")  # <DGX1V|DGXA100>, AMP|FP32
DATA_PATHS = {"/imagenet", "/data/imagenet", "/data/flowers102"}  # the data paths the recipes write (flowers102: finetune/)
TRAINERS = {"main.py", "launch.py", "quant_main.py"}
VERSION = "b0"


def _expand(line_id: str, line: str) -> list[tuple[str, str]]:
    """One (id, line) per alternative of every `A|B` in the line."""
    match = ALTERNATIVES.search(line)
    if match is None:
        return [(line_id, line)]
    return [expanded for choice in (match.group(1) or match.group(2)).split("|")
            for expanded in _expand(f"{line_id}-{choice}", line[:match.start()] + choice + line[match.end():])]


def _readme_cases() -> list[tuple[str, str]]:
    """The README's lines with alternatives expanded; a line written twice (whitespace aside) runs once."""
    seen, cases = set(), []
    for line_id, line in README_LINES:
        for case_id, case in _expand(line_id, line):
            if " ".join(case.split()) not in seen:
                seen.add(" ".join(case.split()))
                cases.append((case_id, case))
    return cases


def _recipes_run_by_readme() -> set[Path]:
    return {(ROOT / line.split()[1]).resolve() for _, line in README_LINES if line.startswith("bash ")}


RECIPE_FILES = [p for p in sorted(RECIPES.glob("**/*.sh")) if p.resolve() not in _recipes_run_by_readme()]


def recipe_lines(recipe: Path, arg: str) -> list[str]:
    """The python command lines `bash RECIPE ARG` runs, in order, as bash expands them ($1, quotes, loops):
    the recipe is sourced with `python` defined as a function that prints its command line."""
    capture = 'python() { printf "%q " python "$@"; echo; }; source "$0" "$1"'
    result = subprocess.run(["bash", "-c", capture, str(recipe), arg], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"{recipe} runs no python command"
    return lines


def _set(args: list[str], names: tuple[str, ...], value: str) -> None:
    """Give the flag `names[0]` (or its aliases) `value`: replaced where the line has it, appended where not."""
    for i, token in enumerate(args):
        if token in names:
            args[i + 1] = value
            return
        if token.split("=", 1)[0] in names and "=" in token:
            args[i] = f"{token.split('=', 1)[0]}={value}"
            return
    args += [names[0], value]


def adapt(line: str, fill: dict[str, str], workspace: Path, data: Path) -> list[str]:
    """The toy-scale argv of one reference command line; the same rules for every line.

    Placeholders take the values in `fill` (`<version>` b0, `<batch size>` 4, files of the session's toy runs,
    the README's "and the rest" `...` / `<any other parameters ...>` nothing); the data path (`/imagenet`,
    `<path to imagenet>`) becomes the toy dataset; `python` is this interpreter. A `-h` line runs as written.
    For main.py, launch.py and quant_main.py, only sizes change, everything else stays as written:
      --image-size 32 (and --eval-image-size, --base-image-size 32: the sizes configs.yml gives v2-s),
      -b 4, --prof 2, --run-epochs 1 (at most one epoch per invocation; --epochs stays, so the LR schedule and
      --resume's epoch check are the reference's), --workspace a fresh tmp folder (the ./ default would write
      into the checkout), --num_classes 4 to fit the toy dataset (not with --pretrained: NGC weights keep
      their 1000 ImageNet classes, of which the toy labels 0-3 are valid indices; but with --pretrained
      --reset-classifier, whose new head fits the data, as the fine-tuning recipe's 102 fits Flowers-102).
    classify.py and model2onnx.py: --image-size 32, -b 4, --num_classes 4 but with --pretrained.
    The one change that is not a size: multiproc.py's --nproc_per_node 8 becomes PROCESSES (2)
    -- 8 processes on 2 cores at toy scale are only slower, the code path (torchrun, gloo, all-reduce, rank-0
    files) is the same. (Running it, `with_master_port` gives multiproc.py a free port.)
    """
    for placeholder, value in fill.items():
        line = line.replace(placeholder, value)
    leftover = re.findall(r"<[^<>]+>", line)
    assert not leftover, f"no toy value for {leftover} in {line!r}"
    argv = [str(data) if token in DATA_PATHS else token for token in shlex.split(line) if token != "..."]
    argv = [sys.executable if token == "python" else token for token in argv]
    scripts = [i for i, token in enumerate(argv) if token.endswith(".py")]
    if Path(argv[scripts[0]]).name == "multiproc.py" and "--nproc_per_node" in argv[:scripts[-1]]:
        at = argv.index("--nproc_per_node") + 1
        argv[at] = str(min(int(argv[at]), PROCESSES))
    head, args = argv[:scripts[-1] + 1], argv[scripts[-1] + 1:]
    if "-h" in args or "--help" in args:
        return head + args
    script = Path(head[-1]).name
    pretrained = "--pretrained" in args
    if script in TRAINERS:
        for names, value in ((("--image-size",), IMAGE_SIZE), (("--eval-image-size",), IMAGE_SIZE),
                             (("--base-image-size",), IMAGE_SIZE), (("-b", "--batch-size"), BATCH),
                             (("--prof",), PROF), (("--workspace",), workspace)):
            _set(args, names, str(value))
        if "--run-epochs" not in args:
            args += ["--run-epochs", "1"]
    elif script in ("classify.py", "model2onnx.py"):
        _set(args, ("--image-size",), str(IMAGE_SIZE))
        if "-b" in args or "--batch-size" in args:
            _set(args, ("-b", "--batch-size"), str(BATCH))
    if script in TRAINERS | {"classify.py", "model2onnx.py"} and (not pretrained or "--reset-classifier" in args):
        _set(args, ("--num_classes", "--num-classes"), str(CLASSES))
    return head + args


# --- Session fixtures: the toy dataset, one float and one QAT toy run for the lines that need their files,
# and a local stand-in for NGC.

def _run(argv: list[str], env: dict[str, str], timeout: int = LINE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run argv from the checkout's root, as its own process forked from a server that has imported torch,
    torchvision and Model Optimizer once, as are multiproc.py's workers (tests/prefork.py: ~5 s less per
    process); past `timeout` its whole process group (torchrun's ranks and data workers included) is killed
    and the test fails, naming the hang and showing the end of the output."""
    try:
        return prefork.run(argv, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        output = ((err.stdout or "") + (err.stderr or "")).strip().splitlines()
        pytest.fail(f"no exit within {timeout} s (killed): {shlex.join(argv)}\n" + "\n".join(output[-15:]),
                    pytrace=False)


def _ok(result: subprocess.CompletedProcess, argv: list[str]) -> None:
    """Exit status 0, or a failure that shows the command and the end of its output."""
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        errors = [line for line in output if re.search(r"error|Error|failed", line)]
        pytest.fail(f"exit {result.returncode}: {shlex.join(argv)}\n" + "\n".join(output[-25:]) +
                    (f"\nfirst error line: {errors[0]}" if errors else ""), pytrace=False)


@pytest.fixture(scope="session")
def toy_env(tmp_path_factory) -> dict[str, str]:
    """Subprocess environment: the torch hub cache in tmp (never the user's)."""
    return {**os.environ, "TORCH_HOME": str(tmp_path_factory.mktemp("torch_home")), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory, toy_env) -> Path:
    data = tmp_path_factory.mktemp("reference_data") / "imagenet"
    argv = [sys.executable, "-m", "image_classification.data.generated", "--output", str(data),
            "--classes", str(CLASSES), "--train-per-class", "8", "--val-per-class", "4",
            "--image-size", str(IMAGE_SIZE)]
    _ok(_run(argv, toy_env), argv)
    return data


@pytest.fixture(scope="session")
def float_runs(tmp_path_factory, toy_data, toy_env):
    """`float_runs(arch)`: that arch trained for 1 of 2 epochs (a mid-training checkpoint) and its weights; seeded,
    so that the QAT lines calibrate the same weights every time."""
    runs = {}

    def run(arch: str) -> dict[str, Path]:
        if arch not in runs:
            ws = tmp_path_factory.mktemp(f"float_run_{arch}")
            argv = [sys.executable, "main.py", str(toy_data), "--arch", arch, "--num_classes", str(CLASSES),
                    "--image-size", str(IMAGE_SIZE), "-b", str(BATCH), "--epochs", "2", "--run-epochs", "1",
                    "--data-backend", "pytorch", "-j", "1", "--seed", "0", "--workspace", str(ws)]
            _ok(_run(argv, toy_env), argv)
            weights = ws / f"{arch}_weights.pth"
            argv = [sys.executable, "checkpoint2model.py", "--checkpoint-path", str(ws / "checkpoint.pth.tar"),
                    "--weight-path", str(weights)]
            _ok(_run(argv, toy_env), argv)
            runs[arch] = {"checkpoint": ws / "checkpoint.pth.tar", "weights": weights}
        return runs[arch]
    return run


@pytest.fixture(scope="session")
def float_run(float_runs) -> dict[str, Path]:
    return float_runs(f"efficientnet-{VERSION}")


@pytest.fixture(scope="session")
def quant_run(tmp_path_factory, toy_data, toy_env, float_run) -> dict[str, Path]:
    """QAT of the float run's weights for 1 of 2 epochs, at the quant-b0 recipe's optimizer settings."""
    ws = tmp_path_factory.mktemp("quant_run")
    argv = [sys.executable, "quant_main.py", str(toy_data), "--arch", "efficientnet-quant-b0",
            "--pretrained-from-file", str(float_run["weights"]), "--num_classes", str(CLASSES),
            "--image-size", str(IMAGE_SIZE), "-b", str(BATCH), "--epochs", "2", "--run-epochs", "1",
            "--optimizer", "sgd", "--lr", "0.0125", "--momentum", "0.89", "--weight-decay", "4.50e-05",
            "--data-backend", "pytorch", "-j", "1", "--workspace", str(ws)]
    _ok(_run(argv, toy_env), argv)
    weights = ws / "quant_b0_weights.pth"
    argv = [sys.executable, "checkpoint2model.py", "--checkpoint-path", str(ws / "quantized_checkpoint.pth.tar"),
            "--weight-path", str(weights)]
    _ok(_run(argv, toy_env), argv)
    return {"checkpoint": ws / "quantized_checkpoint.pth.tar", "weights": weights}


@pytest.fixture(scope="session")
def ngc_mirror(tmp_path_factory) -> str:
    """NGC's b0 file (random weights in its 20.12.0 layout, 1000 classes) served on 127.0.0.1, as
    tests/test_models.py's weights_server does; WITH_LOCAL_NGC points the archs' pretrained_url at it."""
    from image_classification.models import get_entry
    from test_models import ngc_style
    root = tmp_path_factory.mktemp("ngc")
    url = get_entry(f"efficientnet-{VERSION}").pretrained_url
    torch.save(ngc_style(get_entry(f"efficientnet-{VERSION}")().state_dict()), root / url.rsplit("/", 1)[1])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# `python -c WITH_LOCAL_NGC SCRIPT ARGS...` runs SCRIPT with every pretrained_url on the local mirror: the
# subprocess form of tests/test_models.py's monkeypatch.setattr(entry, "pretrained_url", ...).
WITH_LOCAL_NGC = """
import os, runpy, sys
from image_classification.models import available_models
for entry in available_models().values():
    if entry.pretrained_url:
        entry.pretrained_url = os.environ["REFERENCE_NGC_MIRROR"] + "/" + entry.pretrained_url.rsplit("/", 1)[1]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _fill(line: str, request, tmp_path: Path, toy_data: Path) -> dict[str, str]:
    """Toy values of the placeholders `line` has; the toy runs start only for lines that need them.
    `<path to checkpoint>` is the QAT run's on a quant_main.py line, the float run's elsewhere."""
    quant = "quant_main.py" in line

    def run(name: str) -> dict[str, Path]:
        return request.getfixturevalue(name)

    values = {
        "<version>": lambda: VERSION,
        "<batch size>": lambda: str(BATCH),
        "<# of QAT epochs>": lambda: "2",
        "<path to imagenet>": lambda: str(toy_data),
        "<path to JPEG image>": lambda: str(sorted((toy_data / "val").glob("*/*"))[0]),
        "<path were to store checkpoints and logs>": lambda: str(tmp_path / "ws"),
        "<path to checkpoint>": lambda: str(run("quant_run" if quant else "float_run")["checkpoint"]),
        "<path where weights will be stored>": lambda: str(tmp_path / "weights.pth"),
        "<path to weights from previous step>": lambda: str(run("float_run")["weights"]),
        "<path to pretrained weights>": lambda: str(run("float_run")["weights"]),
        "<path to non-quantized model weights>": lambda: str(run("float_run")["weights"]),
        "<path to mid-training checkpoint>": lambda: str(run("quant_run")["checkpoint"]),
        "<path to quant checkpoint>": lambda: str(run("quant_run")["checkpoint"]),
        "<path where quant weights will be stored>": lambda: str(tmp_path / "quant_weights.pth"),
        "<path to model quant weights>": lambda: str(run("quant_run")["weights"]),
        "<path to quant weights>": lambda: str(run("quant_run")["weights"]),
        "<any other parameters for training such as batch, momentum etc.>": lambda: "",
    }
    return {name: value() for name, value in values.items() if name in line}


# --- What the reference promises a line leaves behind.

def _value(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else default


def check_promises(argv: list[str], result: subprocess.CompletedProcess) -> None:
    """Exit status 0, and the files or output the reference promises for this kind of line: the report (and
    checkpoint, when training with checkpoints on) in the workspace; classify.py's image path, then its top-5
    as `<name>: <p>%` lines; checkpoint2model.py's plain state dict; model2onnx.py's .onnx file."""
    _ok(result, argv)
    scripts = [i for i, token in enumerate(argv) if token.endswith(".py")]
    script, args = Path(argv[scripts[-1]]).name, argv[scripts[-1] + 1:]
    if "-h" in args or "--help" in args:
        assert "usage:" in result.stdout
    elif script in TRAINERS:
        workspace = Path(_value(args, "--workspace"))
        mode = _value(args, "--mode", "")
        evaluate = "--evaluate" in args or mode in ("benchmark_inference", "evaluate")
        report = workspace / _value(args, "--raport-file", "experiment_raport.json")
        assert report.is_file(), f"no report {report.name} in the workspace: {sorted(os.listdir(workspace))}"
        lines = report.read_text().splitlines()
        assert lines and all(line.startswith("DLLL ") for line in lines), report
        logged = [record["data"] for record in map(json.loads, (line[len("DLLL "):] for line in lines))
                  if record["type"] == "LOG" and record["step"] != "PARAMETER"]
        if evaluate:
            assert any("val.top1" in data for data in logged), "the report logs no val.top1"
        else:
            losses = [data["train.loss"] for data in logged if "train.loss" in data]
            assert losses and all(math.isfinite(loss) for loss in losses), f"train.loss {losses}"
            if "--no-checkpoints" not in args and not mode.startswith("benchmark_training"):
                prefix = "quantized_" if script == "quant_main.py" else ""
                name = prefix + _value(args, "--checkpoint-filename", "checkpoint.pth.tar")
                assert (workspace / name).is_file(), f"no {name} in {sorted(os.listdir(workspace))}"
    elif script == "classify.py":
        image = _value(args, "--image")
        lines = result.stdout.strip().splitlines()
        assert image in lines, result.stdout
        at = lines.index(image)
        classes = int(_value(args, "--num_classes", "1000"))  # a 4-class model has only a top-4
        top5 = lines[at + 1:at + 1 + min(5, classes)]
        assert len(top5) == min(5, classes) and all(re.fullmatch(r".+: \d+\.\d%", line) for line in top5), result.stdout
    elif script == "checkpoint2model.py":
        state_dict = torch.load(_value(args, "--weight-path"), map_location="cpu", weights_only=True)
        assert state_dict and not any(key.startswith("module.") for key in state_dict)
    elif script == "model2onnx.py":
        weights = Path(_value(args, "--pretrained-from-file"))
        output = Path(_value(args, "--output", str(weights.with_suffix(".onnx"))))
        assert output.is_file() and output.stat().st_size > 0, f"no {output}"


def run_line(argv: list[str], env: dict[str, str], mirror: str | None) -> subprocess.CompletedProcess:
    if "--pretrained" in argv:  # NGC weights come from the local mirror
        assert mirror is not None
        argv = [argv[0], "-c", WITH_LOCAL_NGC, *argv[1:]]
        env = {**env, "REFERENCE_NGC_MIRROR": mirror}
    return _run(argv, env)


def with_master_port(argv: list[str], port: int) -> list[str]:
    """argv with `--master_port port` for its multiproc.py: other tests start process groups beside it (xdist's
    other worker), so the default 29500 could be taken."""
    scripts = [i for i, token in enumerate(argv) if token.endswith(".py")]
    if not scripts or Path(argv[scripts[0]]).name != "multiproc.py":
        return argv
    return [*argv[:scripts[0] + 1], "--master_port", str(port), *argv[scripts[0] + 1:]]


def _run_lines(lines: list[str], request, tmp_path: Path, toy_data: Path, toy_env: dict[str, str]) -> None:
    """Adapt and run each line in its own workspace; lines that adaptation makes the same but for their report's
    name (a recipe's sweep over batch sizes, -b 1 ... 256 with raport_<bs>.json) run once."""
    done = set()
    for n, line in enumerate(lines):
        workspace = tmp_path / f"ws{n}"
        workspace.mkdir()
        argv = adapt(line, _fill(line, request, tmp_path, toy_data), workspace, toy_data)
        key = tuple(token for token in argv if token != str(workspace) and not token.startswith("raport"))
        if key in done:
            continue
        done.add(key)
        argv = with_master_port(argv, free_port())
        mirror = request.getfixturevalue("ngc_mirror") if "--pretrained" in argv else None
        check_promises(argv, run_line(argv, toy_env, mirror))


@pytest.mark.parametrize("line", [case for _, case in _readme_cases()], ids=[i for i, _ in _readme_cases()])
@pytest.mark.slow
def test_readme_line_runs(line, request, tmp_path, toy_data, toy_env):
    if line.startswith("bash "):  # a recipe: its python lines, as bash runs them
        recipe, arg = re.fullmatch(r"bash (\S+) (.+)", line).groups()
        lines = recipe_lines(ROOT / recipe, _fill(line, request, tmp_path, toy_data).get(arg, arg))
    else:
        lines = [line]
    _run_lines(lines, request, tmp_path, toy_data, toy_env)


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[str(p.relative_to(RECIPES).with_suffix(""))
                                                     for p in RECIPE_FILES])
@pytest.mark.slow
def test_recipe_runs(recipe, request, tmp_path, toy_data, toy_env):
    # $1: the workspace; for the quantization recipes, the float weights to start from
    if "quantization" in recipe.parts:
        arch = recipe.stem.split("_")[1].replace("-quant", "")  # DGX1V-32G_efficientnet-quant-b4_FP32: b4's
        arg = str(request.getfixturevalue("float_runs")(arch)["weights"])
    else:
        arg = str(tmp_path / "ws")
    _run_lines(recipe_lines(recipe, arg), request, tmp_path, toy_data, toy_env)


def test_adapt_changes_only_sizes(tmp_path):
    """The adaptation itself, on one line of each kind."""
    data, ws = tmp_path / "data", tmp_path / "ws"
    line = ("python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-b0 --precision AMP --mode "
            "convergence --platform DGXA100 /imagenet -b 256 --workspace ./ --raport-file raport.json")
    assert with_master_port(adapt(line, {}, ws, data), 40000) == [
        sys.executable, "./multiproc.py", "--master_port", "40000", "--nproc_per_node", "2", "./launch.py", "--model",
        "efficientnet-b0", "--precision", "AMP", "--mode", "convergence", "--platform", "DGXA100", str(data), "-b",
        "4", "--workspace", str(ws), "--raport-file", "raport.json", "--image-size", "32", "--eval-image-size", "32",
        "--base-image-size", "32", "--prof", "2", "--run-epochs", "1", "--num_classes", "4"]
    line = "python classify.py --arch efficientnet-<version> --pretrained --precision AMP --image <path to JPEG image>"
    assert adapt(line, {"<version>": "b0", "<path to JPEG image>": "a.jpg"}, ws, data) == [
        sys.executable, "classify.py", "--arch", "efficientnet-b0", "--pretrained", "--precision", "AMP",
        "--image", "a.jpg", "--image-size", "32"]
    assert adapt("python main.py -h", {}, ws, data) == [sys.executable, "main.py", "-h"]
    assert with_master_port([sys.executable, "main.py", "-h"], 40000) == [sys.executable, "main.py", "-h"]
    assert [case_id for case_id, _ in _expand("x", "--platform <DGX1V|DGXA100> --precision AMP|FP32")] == [
        "x-DGX1V-AMP", "x-DGX1V-FP32", "x-DGXA100-AMP", "x-DGXA100-FP32"]
