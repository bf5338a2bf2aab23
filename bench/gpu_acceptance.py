#!/usr/bin/env python3
"""The GPU acceptance run: every GPU path of the suite through its own command lines, with the numbers.

    bash bench/run_gpu.sh OUT_DIR                 # one GPU; about 6-8 minutes on an H200
    bash bench/run_gpu.sh --quick OUT_DIR         # the same steps on the CPU at toy sizes (or QUICK=1)
    bash bench/run_gpu.sh --steps train-resume,classify-onnx OUT_DIR     # some steps again, same OUT_DIR

Each step runs command lines as users type them (launch.py, main.py, multiproc.py, classify.py, model2onnx.py,
quant_main.py, the bench scripts) under one timeout for the step, checks what they leave (exit status, the
report's records, files, printed lines) and records its numbers. A step is PASS, FAIL with the reason (an exit
status and the error line, a timeout, an expected output missing) or SKIP with the reason (no GPU, DALI or Model
Optimizer missing, a step it needs left no file). The run goes on after a failure, and stops starting steps when
--budget is spent (those are FAIL). OUT_DIR gets summary.json, summary.md, logs/<NN>-<step>.log and every
step's workspace under ws/; the exit status is 1 when any step failed.

This script imports nothing beyond the standard library, so that a broken torch install is a failed step with
its error, not a crash of the run; the checks that need torch are bench/gpu_checks.py's commands.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification import logger  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# How the reasons of a quick (CPU) run's skipped steps begin.
NO_GPU = "no GPU"
QUICK_ONLY = "quick mode"


class StepFailed(Exception):
    """A check of the step failed; the message is the reason."""


class StepSkipped(Exception):
    """The step cannot run here; the message says why."""


# --- sizes --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """What the steps run at: one GPU (a number worth recording) or the CPU quick mode (a check of the plumbing)."""

    device: str
    platform: str                # configs.yml platform of the launch.py steps (DGXH200 when the file has it)
    precision: str               # launch.py --precision; AMP also means --amp for main.py steps
    classes: int                 # generated dataset
    train_per_class: int
    val_per_class: int
    data_image_size: int
    bench_batch: int             # launch.py benchmark modes, bench scripts
    bench_image_size: int
    train_iterations: int        # --prof of the benchmark modes
    infer_iterations: int
    image_size: int              # main.py runs on the generated data
    batch: int
    workers: int
    epochs: int                  # train-resume: epochs - 1 first, then --resume for the last one
    compile_iterations: int
    qat_iterations: int

    @property
    def amp(self) -> list[str]:
        return ["--amp"] if self.precision == "AMP" else []


GPU_SIZES = Sizes(device="cuda", platform="DGXH200", precision="AMP", classes=10, train_per_class=32,
                  val_per_class=16, data_image_size=160, bench_batch=256, bench_image_size=224,
                  train_iterations=100, infer_iterations=20, image_size=128, batch=32, workers=4, epochs=3,
                  compile_iterations=30, qat_iterations=10)
# bf16 autocast is emulated on CPUs without AVX512-BF16 (main.py warns): fp32 keeps the quick run quick.
QUICK_SIZES = Sizes(device="cpu", platform="CPU", precision="FP32", classes=4, train_per_class=8, val_per_class=4,
                    data_image_size=48, bench_batch=4, bench_image_size=32, train_iterations=3, infer_iterations=3,
                    image_size=32, batch=8, workers=0, epochs=2, compile_iterations=3, qat_iterations=3)


# --- running commands ---------------------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]
"""runner(argv, *, cwd, env, timeout) -> CompletedProcess, raising subprocess.TimeoutExpired."""


def run_process(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run argv in a process group of its own to its end; on timeout the group gets SIGTERM, 10 s later SIGKILL.

    stdout and stderr are merged (the log reads as the terminal would), returned as stdout.
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
            output.seek(0)
            raise subprocess.TimeoutExpired(argv, timeout, output.read(), "") from None
        finally:
            _signal_group(process.pid, signal.SIGKILL)  # what it left behind (loader workers of a crashed rank)
        output.seek(0)
        return subprocess.CompletedProcess(argv, status, output.read(), "")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def error_line(output: str) -> str:
    """The line of a failed command's output that says why: an entry point's last `<prog>: error: ...` line (not
    multiproc.py's 'failed on rank' after it), else its last line naming an error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"\S+: error: ", r"[Ee]rror|ERROR|Traceback|Killed"):
        for line in reversed(lines):
            if re.search(pattern, line):
                return line[:300]
    return lines[-1][:300] if lines else "no output"


def free_port() -> int:
    """A TCP port free on this machine now, for multiproc.py --master_port (29500 may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- reports ------------------------------------------------------------------------------------------------

def read_report(path: Path) -> list[tuple[object, dict]]:
    """The LOG records of a DLLogger JSON-lines report as (step, data); StepFailed when there is none.

    DLLogger writes one line per verbosity level of a step, and null for a registered metric a summary lacks:
    consecutive lines of the same step are merged here, a null never hiding a value.
    """
    if not path.is_file():
        raise StepFailed(f"no report {path}")
    records: list[tuple[object, dict]] = []
    try:
        parsed = logger.read_report(path)
    except logger.ReportError as err:
        raise StepFailed(str(err)) from None
    for record in parsed:
        if record.get("type") != "LOG":
            continue
        step_, data = record["step"], record["data"]
        if records and records[-1][0] == step_ and step_ != "PARAMETER":
            merged = records[-1][1]
            merged.update({k: v for k, v in data.items() if v is not None or k not in merged})
        else:
            records.append((step_, dict(data)))
    if not records:
        raise StepFailed(f"report {path} has no records")
    return records


def epoch_records(records: list[tuple[object, dict]]) -> list[tuple[int, dict]]:
    """(epoch, data) of the per-epoch records, in file order (an epoch logged twice appears twice)."""
    return [(step[0], data) for step, data in records if isinstance(step, list) and len(step) == 1
            and isinstance(step[0], int)]


def iteration_values(records: list[tuple[object, dict]], key: str) -> list[float]:
    """`key` of the per-iteration records ([epoch, iteration]), in order."""
    return [data[key] for step, data in records if isinstance(step, list) and len(step) == 2
            and isinstance(step[1], int) and isinstance(data.get(key), (int, float))]


def steady(values: list[float], warmup: int) -> float | None:
    """Median after the first `warmup` values (cuDNN's algorithm search, compilation), or of all when too few."""
    tail = values[warmup:] or values
    return statistics.median(tail) if tail else None


def parameters(records: list[tuple[object, dict]]) -> dict:
    """The run's PARAMETER records merged (the flags, and the placement main.py adds: world_size, distributed);
    a resumed run's come last and win."""
    merged: dict = {}
    for step_, data in records:
        if step_ == "PARAMETER":
            merged.update(data)
    return merged


def last_epoch(records: list[tuple[object, dict]]) -> dict:
    epochs = epoch_records(records)
    if not epochs:
        raise StepFailed("the report has no epoch record")
    return epochs[-1][1]


def number(data: dict, key: str) -> float:
    """A finite number of a record; StepFailed naming the key otherwise."""
    value = data.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StepFailed(f"the report's {key} is {value!r}, not a finite number")
    return value


def printed_tables(output: str) -> str:
    """The tables a bench script prints (from its first title line to its `wrote` line)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(("training step", "inference,"))), None)
    if start is None:
        return ""
    end = next((i for i, line in enumerate(lines) if line.startswith("wrote ")), len(lines))
    return "\n".join(lines[start:end]).strip()


def rounded(value, digits: int = 4):
    """Numbers to `digits` significant digits for the summary (the reports keep them exact)."""
    if isinstance(value, float) and math.isfinite(value) and value:
        return round(value, max(0, digits - 1 - int(math.floor(math.log10(abs(value))))))
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


# --- the run ------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What a step did: status, seconds, reason (FAIL/SKIP), a line of headline numbers, all its numbers."""

    step: str
    title: str
    status: str = SKIP
    seconds: float = 0.0
    reason: str = ""
    note: str = ""
    metrics: dict = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    log: str = ""
    tables: str = ""             # tables a bench script printed


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    timeout_s: float             # on one GPU
    quick_timeout_s: float       # on 2 CPU cores, quick sizes
    run: Callable[["StepRun"], None]


STEPS: list[Step] = []


def step(name: str, title: str, timeout_s: float, quick_timeout_s: float):
    """Register a step function; steps run in the order they are defined."""
    def register(fn: Callable[["StepRun"], None]) -> Callable[["StepRun"], None]:
        STEPS.append(Step(name, title, timeout_s, quick_timeout_s, fn))
        return fn
    return register


class Acceptance:
    """One acceptance run: where it writes, how it runs commands, what earlier steps left for later ones."""

    def __init__(self, out: Path, *, quick: bool, runner: Runner = run_process, budget_s: float | None = None,
                 timeouts: dict[str, float] | None = None, python: str = sys.executable):
        self.out = out.resolve()
        self.quick = quick
        self.sizes = QUICK_SIZES if quick else GPU_SIZES
        if not quick and "DGXH200:" not in (ROOT / "configs.yml").read_text(encoding="utf-8"):
            self.sizes = replace(GPU_SIZES, platform="DGXA100")
        self.runner = runner
        self.budget_s = budget_s if budget_s is not None else (900.0 if quick else 470.0)
        self.timeouts = dict(timeouts or {})
        self.python = python
        self.results: dict[str, Result] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if quick:
            # The quick run checks the plumbing, not the speed: one compute thread per process keeps two gloo ranks
            # (and other jobs) on a 2-core machine from oversubscribing it, where spinning OpenMP threads are slow.
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self._imports: dict[str, str | None] = {}

    # paths shared between steps
    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def checkpoint(self) -> Path:
        """The float b0 of train-resume: its best checkpoint."""
        return self.workspace("train-resume") / "model_best.pth.tar"

    def workspace(self, name: str) -> Path:
        return self.out / "ws" / name

    def run(self, selected: list[str] | None = None) -> list[Result]:
        """Run the steps (all, or those named) in order; each result is in summary.json as soon as it is known."""
        start = time.monotonic()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        for index, spec in enumerate(STEPS, start=1):
            result = Result(spec.name, spec.title, log=f"logs/{index:02d}-{spec.name}.log")
            self.results[spec.name] = result
            timeout = self.timeouts.get(spec.name, spec.quick_timeout_s if self.quick else spec.timeout_s)
            left = self.budget_s - (time.monotonic() - start)
            if selected is not None and spec.name not in selected:
                result.reason = "not selected (--steps)"
                result.log = ""
            elif left < 1:
                result.status, result.reason = FAIL, f"not run: the run's {self.budget_s:g} s budget was spent"
                result.log = ""
            else:
                try:
                    self._run_step(spec, result, min(timeout, left), index, budget_cut=left < timeout)
                except KeyboardInterrupt:  # the step's processes are gone (run_process kills its group)
                    result.status, result.reason = FAIL, "interrupted (Ctrl-C); the later steps did not run"
                    self.write_summary(time.monotonic() - start)
                    raise
            self.write_summary(time.monotonic() - start)
        return list(self.results.values())

    def _run_step(self, spec: Step, result: Result, timeout: float, index: int, budget_cut: bool) -> None:
        print(f"[{index:2d}/{len(STEPS)}] {spec.name:<14} {spec.title} (timeout {timeout:.0f} s) ...", flush=True)
        log = self.out / result.log
        log.write_text(f"# step {spec.name}: {spec.title}\n# timeout {timeout:.0f} s\n", encoding="utf-8")
        limit = f"{timeout:g} s" + (f" (what was left of the run's {self.budget_s:g} s budget)" if budget_cut else "")
        run = StepRun(self, result, log, time.monotonic() + timeout, limit)
        start = time.monotonic()
        try:
            spec.run(run)
            result.status = PASS
        except StepSkipped as err:
            result.status, result.reason = SKIP, str(err)
        except StepFailed as err:
            result.status, result.reason = FAIL, str(err)
        except Exception as err:  # noqa: BLE001 -- a defect of this script is one failed step, not a lost run
            result.status, result.reason = FAIL, f"gpu_acceptance.py: {type(err).__name__}: {err}"
        result.seconds = round(time.monotonic() - start, 1)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"\n# {result.status} in {result.seconds} s{': ' + result.reason if result.reason else ''}\n")
        print(f"        {result.status} {result.seconds:.1f} s  {result.reason or result.note}", flush=True)

    def missing_module(self, module: str) -> str | None:
        """None when `module` imports under this run's Python, else why not (from the env step's report, or one
        import in a subprocess when that report is missing)."""
        if module not in self._imports:
            key = {"nvidia.dali": "dali", "modelopt.torch.quantization": "modelopt", "timm": "timm"}[module]
            env_report = self.out / "env.json"
            version = None
            if env_report.is_file():
                version = json.loads(env_report.read_text(encoding="utf-8")).get("versions", {}).get(key)
            if version is None:
                try:
                    done = self.runner([self.python, "-c", f"import {module}"], cwd=ROOT, env=self.env, timeout=120)
                    version = "importable" if done.returncode == 0 else \
                        f"absent ({error_line(done.stdout + done.stderr)})"
                except subprocess.TimeoutExpired:
                    version = "absent (import timed out after 120 s)"
            self._imports[module] = f"{module} does not import: {version[len('absent ('):-1]}" \
                if version.startswith("absent") else None
        return self._imports[module]

    # --- summary ---------------------------------------------------------------------------------------------

    def overall(self) -> str:
        return FAIL if any(r.status == FAIL for r in self.results.values()) else PASS

    def write_summary(self, seconds: float) -> None:
        """summary.json and summary.md, rewritten after every step (a killed run still leaves what it did)."""
        env = {}
        if (self.out / "env.json").is_file():
            env = json.loads((self.out / "env.json").read_text(encoding="utf-8"))
        machine = {"gpu": env.get("gpu"), "cuda": env.get("cuda"), "cudnn": env.get("cudnn"),
                   **env.get("versions", {})}
        payload = {
            "result": self.overall(),
            "started": self.started,
            "seconds": round(seconds, 1),
            "mode": "quick (CPU)" if self.quick else "GPU",
            "budget_s": self.budget_s,
            "sizes": asdict(self.sizes),
            "python": self.python,
            "machine": machine,
            "steps": {name: {k: v for k, v in asdict(r).items() if k != "step"} for name, r in self.results.items()},
        }
        (self.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        (self.out / "summary.md").write_text(self.markdown(payload), encoding="utf-8")

    def table_rows(self) -> list[tuple[str, str, str, str]]:
        return [(name, r.status, f"{r.seconds:.1f}" if r.seconds else "-", r.reason or r.note)
                for name, r in self.results.items()]

    def markdown(self, payload: dict) -> str:
        machine = payload["machine"]
        lines = [f"# GPU acceptance run: {payload['result']}", "",
                 f"{payload['mode']}, started {payload['started']}, {payload['seconds']:.0f} s of a "
                 f"{payload['budget_s']:g} s budget; {machine.get('gpu') or 'no GPU'}, torch {machine.get('torch')}, "
                 f"CUDA {machine.get('cuda')}, cuDNN {machine.get('cudnn')}, Python {machine.get('python')}.", "",
                 "| step | status | s | result |", "|---|---|---|---|"]
        lines += [f"| {name} | {status} | {seconds} | {cell} |" for name, status, seconds, text in self.table_rows()
                  for cell in [text.replace("|", r"\|")]]
        lines += ["", "## Numbers", ""]
        for name, result in self.results.items():
            if not result.metrics:
                continue
            lines += [f"### {name}: {result.title}", "", "```json", json.dumps(result.metrics, indent=2), "```", ""]
            if result.tables:
                lines += ["```", result.tables, "```", ""]
        lines += ["## Commands", ""]
        for name, result in self.results.items():
            if result.commands:
                lines += [f"### {name} ({result.log})", "", "```"] + result.commands + ["```", ""]
        return "\n".join(lines) + "\n"

    def print_table(self) -> None:
        """The summary table on stdout, cut to the terminal's width."""
        rows = [("step", "status", "s", "result")] + self.table_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        width = shutil.get_terminal_size((120, 24)).columns
        print()
        for n, row in enumerate(rows):
            line = "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3]])
            print(line if len(line) <= width else line[:width - 3] + "...")
            if n == 0:
                print("-" * min(width, max(len(line), 60)))
        print(f"\n{self.overall()}: {sum(r.status == PASS for r in self.results.values())} passed, "
              f"{sum(r.status == FAIL for r in self.results.values())} failed, "
              f"{sum(r.status == SKIP for r in self.results.values())} skipped; {self.out}/summary.md")


class StepRun:
    """What a step function uses: run a command under the step's timeout, check files, record numbers."""

    def __init__(self, acceptance: Acceptance, result: Result, log: Path, deadline: float, limit: str):
        self.acceptance = acceptance
        self.sizes = acceptance.sizes
        self.quick = acceptance.quick
        self.result = result
        self.log = log
        self.deadline = deadline
        self.limit = limit  # how the timeout reads in a reason: "60 s"

    def command(self, *argv: str | Path) -> str:
        """Run `python argv...` (the repository as working directory); its output, or StepFailed on a non-zero exit
        or when the step's time runs out."""
        args = [self.acceptance.python, *map(str, argv)]
        text = shlex.join(args)
        self.result.commands.append(text)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(f"timed out after {self.limit} (before {shlex.join(map(str, argv[:2]))})")
        start = time.monotonic()
        try:
            done = self.acceptance.runner(args, cwd=ROOT, env=self.acceptance.env, timeout=left)
        except subprocess.TimeoutExpired as err:
            self._log(text, _text(err.stdout) + _text(err.stderr), "timed out", time.monotonic() - start)
            raise StepFailed(f"timed out after {self.limit} ({shlex.join(map(str, argv[:2]))})") from None
        output = (done.stdout or "") + (done.stderr or "")
        self._log(text, output, f"exit status {done.returncode}", time.monotonic() - start)
        if done.returncode != 0:
            raise StepFailed(f"{Path(str(argv[0])).name if argv[0] != '-m' else argv[1]} exit status "
                             f"{done.returncode}: {error_line(output)}")
        return output

    def _log(self, command: str, output: str, status: str, seconds: float) -> None:
        with self.log.open("a", encoding="utf-8") as f:
            f.write(f"\n$ {command}\n{output}{'' if output.endswith(chr(10)) or not output else chr(10)}"
                    f"# {status} after {seconds:.1f} s\n")

    def record(self, **metrics) -> None:
        self.result.metrics.update(rounded(metrics))

    def note(self, text: str) -> None:
        self.result.note = text

    def workspace(self, name: str | None = None) -> Path:
        """A fresh folder for this step's outputs (a previous run's are removed: no stale file can pass a check)."""
        path = self.acceptance.workspace(name or self.result.step)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def need(self, path: Path, made_by: str) -> Path:
        """A file an earlier step makes; SKIP naming that step when it is missing."""
        if not path.exists():
            earlier = self.acceptance.results.get(made_by)
            why = f"{earlier.status}: {earlier.reason}" if earlier and earlier.reason else \
                earlier.status if earlier else "not run"
            raise StepSkipped(f"needs {path.relative_to(self.acceptance.out)} of step {made_by} ({why[:80]})")
        return path

    def need_module(self, module: str) -> None:
        missing = self.acceptance.missing_module(module)
        if missing:
            raise StepSkipped(missing)

    def need_gpu(self, why: str) -> None:
        if self.quick:
            raise StepSkipped(f"{NO_GPU}: {why}")

    def expect(self, condition: bool, reason: str) -> None:
        if not condition:
            raise StepFailed(reason)

    @property
    def device(self) -> list[str]:
        return ["--device", self.sizes.device]

    @property
    def data(self) -> Path:
        return self.need(self.acceptance.data / "val", "data").parent

    @property
    def checkpoint(self) -> Path:
        return self.need(self.acceptance.checkpoint, "train-resume")


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --- the steps ----------------------------------------------------------------------------------------------

@step("env", "versions, GPU, TF32 flags, CPU affinity, no fp32 depthwise under CUDA autocast", 60, 60)
def env_step(s: StepRun) -> None:
    report = s.acceptance.out / "env.json"
    report.unlink(missing_ok=True)
    s.command("bench/gpu_checks.py", "env", "--json", report, *s.device)
    s.expect(report.is_file(), f"gpu_checks.py env wrote no {report}")
    env = json.loads(report.read_text(encoding="utf-8"))
    s.record(**env)
    depthwise = env["fp32_depthwise"]
    gpu = f"{env['gpu']} ({env['gpu_memory_gib']} GiB), CUDA {env['cuda']}, cuDNN {env['cudnn']}" if env.get("gpu") \
        else "no GPU"
    s.note(f"{gpu}, torch {env['versions']['torch']}; fp32 depthwise convs: CUDA fp16 "
           f"{_fp32_calls(depthwise['cuda_fp16'])}, CPU bf16 {_fp32_calls(depthwise['cpu_bf16'])}")


def _fp32_calls(counts) -> str:
    """'0/16': fp32 convolutions of the depthwise layers run; 'skipped: no GPU' as the probe says."""
    return f"{counts['_Fp32Conv']}/{counts['depthwise_conv_bn_act']}" if isinstance(counts, dict) else counts


@step("data", "generated JPEG dataset (image_classification.data.generated)", 60, 60)
def data_step(s: StepRun) -> None:
    z, data = s.sizes, s.acceptance.data
    shutil.rmtree(data, ignore_errors=True)
    s.command("-m", "image_classification.data.generated", "--output", data, "--classes", z.classes,
              "--train-per-class", z.train_per_class, "--val-per-class", z.val_per_class,
              "--image-size", z.data_image_size)
    counts = {split: len(list((data / split).glob("*/*.jpg"))) for split in ("train", "val")}
    s.expect(counts == {"train": z.classes * z.train_per_class, "val": z.classes * z.val_per_class},
             f"expected {z.classes * z.train_per_class} train and {z.classes * z.val_per_class} val images, found "
             f"{counts}")
    s.record(classes=z.classes, images=counts, image_size=z.data_image_size)
    s.note(f"{counts['train']} train + {counts['val']} val JPEGs, {z.classes} classes, {z.data_image_size} px")


def _launch(s: StepRun, mode: str, workspace: Path, *flags) -> list[str]:
    z = s.sizes
    return ["launch.py", "--model", "efficientnet-b0", "--precision", z.precision, "--mode", mode,
            "--platform", z.platform, "-b", z.bench_batch, "--image-size", z.bench_image_size,
            "--workspace", workspace, "--raport-file", "raport.json", *s.device, *flags]


@step("launch-train", "launch.py benchmark_training_short (b0, synthetic): img/s, peak memory, loss scale", 120, 90)
def launch_train_step(s: StepRun) -> None:
    z, ws = s.sizes, s.workspace()
    peak_file = ws / "peak_memory.json"
    # launch.py runs in-process under gpu_checks.py, which then reads torch.cuda.max_memory_allocated: the report
    # has no memory figure.
    s.command("bench/gpu_checks.py", "peak-memory", peak_file,
              *_launch(s, "benchmark_training_short", ws, "--prof", z.train_iterations))
    records = read_report(ws / "raport.json")
    epoch = last_epoch(records)
    ips = iteration_values(records, "train.total_ips")
    s.expect(len(ips) == z.train_iterations, f"expected {z.train_iterations} iteration records (--prof), found "
                                             f"{len(ips)}")
    warmup = max(1, z.train_iterations // 10)
    peak = json.loads(peak_file.read_text(encoding="utf-8")) if peak_file.is_file() else {}
    metrics = {"batch": z.bench_batch, "image_size": z.bench_image_size, "precision": z.precision,
               "iterations": len(ips), "warmup_iterations": warmup, "steady_ips": steady(ips, warmup),
               "train.total_ips": number(epoch, "train.total_ips"),
               "train.compute_ips": number(epoch, "train.compute_ips"),
               "train.grad_scale": number(epoch, "train.grad_scale"), "train.loss": number(epoch, "train.loss"),
               "peak_allocated_mib": peak.get("peak_allocated_mib"), "peak_reserved_mib": peak.get("peak_reserved_mib")}
    s.record(**metrics)
    if not s.quick:
        s.expect(bool(peak.get("peak_allocated_mib")), f"no CUDA peak memory in {peak_file}")
    s.note(f"{metrics['steady_ips']:.1f} img/s steady ({metrics['train.total_ips']:.1f} whole epoch), peak "
           + (f"{peak['peak_allocated_mib'] / 1024:.2f} GiB" if peak.get("peak_allocated_mib") else "n/a (CPU)")
           + f", loss scale {metrics['train.grad_scale']:g}")


@step("launch-infer", "launch.py benchmark_inference (b0, synthetic): img/s, latency percentiles", 90, 90)
def launch_infer_step(s: StepRun) -> None:
    z, ws = s.sizes, s.workspace()
    s.command(*_launch(s, "benchmark_inference", ws, "--data-backend", "synthetic", "--prof", z.infer_iterations))
    epoch = last_epoch(read_report(ws / "raport.json"))
    keys = ["val.total_ips", "val.compute_ips", "val.compute_latency", "val.compute_latency_at90",
            "val.compute_latency_at95", "val.compute_latency_at99", "val.compute_latency_at100",
            "val.first_batch_latency"]
    metrics = {key: number(epoch, key) for key in keys}
    s.record(batch=z.bench_batch, image_size=z.bench_image_size, precision=z.precision, batches=z.infer_iterations,
             **metrics)
    s.note(f"{metrics['val.compute_ips']:.1f} img/s compute ({metrics['val.total_ips']:.1f} total), latency p99 "
           f"{1e3 * metrics['val.compute_latency_at99']:.2f} ms, first batch "
           f"{1e3 * metrics['val.first_batch_latency']:.0f} ms")


def _train_flags(s: StepRun, workspace: Path) -> list:
    """main.py on the generated data: the demo's recipe (scripts/demo.sh) at the run's sizes."""
    z = s.sizes
    return [s.data, "--arch", "efficientnet-b0", "--num_classes", z.classes, "--image-size", z.image_size,
            "-b", z.batch, "-j", z.workers, "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov",
            "--wd", "5e-5", "--lr-schedule", "cosine", "--warmup", "1", "--label-smoothing", "0.1",
            "--bn_momentum", "0.1", "--seed", "0", "--workspace", workspace, "--raport-file", "raport.json",
            *s.device]


def _check_resumed(s: StepRun, output: str, checkpoint: Path, epoch: int, workspace: Path, epochs: int) -> list:
    """The resumed run said where it started, and the report holds every epoch exactly once."""
    s.expect(f"=> resumed from {checkpoint}: epoch {epoch}" in output,
             f"the resumed run does not say it starts at epoch {epoch} (no '=> resumed from {checkpoint}: epoch "
             f"{epoch}' line)")
    epochs_logged = [e for e, _ in epoch_records(read_report(workspace / "raport.json"))]
    s.expect(epochs_logged == list(range(epochs)), f"the report's epoch records are {epochs_logged}, expected "
                                                   f"{list(range(epochs))} once each")
    return epochs_logged


@step("train-resume", "main.py pytorch backend, AMP, NHWC, EMA: epochs, then --resume for one more", 120, 120)
def train_resume_step(s: StepRun) -> None:
    z, ws = s.sizes, s.workspace()
    flags = [*_train_flags(s, ws), "--data-backend", "pytorch", *z.amp, "--memory-format", "nhwc",
             "--use-ema", "0.999", "--epochs", z.epochs]
    s.command("main.py", *flags, "--run-epochs", z.epochs - 1)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "classes.txt"):
        s.expect((ws / name).is_file(), f"main.py wrote no {ws / name}")
    epochs_logged = [e for e, _ in epoch_records(read_report(ws / "raport.json"))]
    s.expect(epochs_logged == list(range(z.epochs - 1)), f"after --run-epochs {z.epochs - 1} the report's epochs "
                                                         f"are {epochs_logged}")
    output = s.command("main.py", *flags, "--resume", ws / "checkpoint.pth.tar")
    _check_resumed(s, output, ws / "checkpoint.pth.tar", z.epochs - 1, ws, z.epochs)
    records = epoch_records(read_report(ws / "raport.json"))
    last = records[-1][1]
    metrics = {"val.top1 per epoch": [number(data, "val.top1") for _, data in records],
               "val_ema.top1": number(last, "val_ema.top1"), "train.loss": number(last, "train.loss"),
               "train.total_ips": number(last, "train.total_ips"), "val.compute_ips": number(last, "val.compute_ips"),
               "train.grad_scale": number(last, "train.grad_scale"), "resumed_at_epoch": z.epochs - 1}
    s.record(**metrics)
    s.note(f"val top-1 {metrics['val.top1 per epoch']} % (EMA {metrics['val_ema.top1']:g} %), resumed at epoch "
           f"{z.epochs - 1}, {metrics['train.total_ips']:.1f} train img/s")


@step("classify-onnx", "classify.py top-5 and model2onnx.py checked in onnxruntime, with the trained b0", 90, 90)
def classify_onnx_step(s: StepRun) -> None:
    z, checkpoint = s.sizes, s.checkpoint
    names = (checkpoint.parent / "classes.txt").read_text(encoding="utf-8").splitlines()
    image = sorted(s.data.glob("val/*/*.jpg"))[0]
    output = s.command("classify.py", "--arch", "efficientnet-b0", "--num_classes", z.classes, "--image-size",
                       z.image_size, "--pretrained-from-file", checkpoint, "--class-names",
                       checkpoint.parent / "classes.txt", "--precision", z.precision, *(["--cpu"] if s.quick else []),
                       "--image", image)
    lines = output.splitlines()
    s.expect(str(image) in lines, f"classify.py did not print the image path {image}")
    after = lines[lines.index(str(image)) + 1:]
    top = [m.groups() for m in (re.fullmatch(r"(.+): (\d+\.\d)%", line) for line in after) if m]
    expected = min(5, z.classes)
    s.expect(len(top) >= expected and all(name in names for name, _ in top[:expected]),
             f"classify.py printed {len(top)} '<class>: <prob>%' lines of the trained classes, expected {expected}")
    ws = s.workspace()
    onnx_file = ws / "b0.onnx"
    output = s.command("model2onnx.py", "--arch", "efficientnet-b0", "--num_classes", z.classes,
                       "--pretrained-from-file", checkpoint, "--device", z.device, "--image-size", z.image_size,
                       "-b", 2 if s.quick else 8, "--output", onnx_file)
    s.expect(onnx_file.is_file() and onnx_file.stat().st_size > 1_000_000, f"model2onnx.py wrote no {onnx_file}")
    agree = re.search(r"onnxruntime agrees with PyTorch .*max abs difference (\S+)", output)
    s.expect(agree is not None, "model2onnx.py printed no onnxruntime check")
    s.record(image=str(image.relative_to(s.acceptance.out)), top5={name: float(p) for name, p in top[:expected]},
             onnx_mib=onnx_file.stat().st_size / 2**20, onnx_max_abs_difference=float(agree[1]))
    s.note(f"top-1 '{top[0][0]}' {top[0][1]} % of {image.parent.name}/{image.name}; ONNX max |diff| {agree[1]}")


def _bench(s: StepRun, script: str, quick_models: str, gpu_models: str, gpu_flags: list) -> dict:
    ws = s.workspace()
    models = quick_models if s.quick else gpu_models
    missing = s.acceptance.missing_module("timm")
    if missing:
        models = ",".join(m for m in models.split(",") if not m.startswith("timm"))
    report = ws / f"{Path(script).stem}.json"
    flags = ["--quick"] if s.quick else gpu_flags
    output = s.command(script, *flags, *s.device, "--models", models, "--json", report)
    s.expect(report.is_file(), f"{script} wrote no {report}")
    payload = json.loads(report.read_text(encoding="utf-8"))
    rows = payload.get("results", [])
    s.expect(len(rows) >= len(models.split(",")) and all(r.get("img_per_s", 0) > 0 for r in rows),
             f"{report}: expected an img/s > 0 for each of {models}")
    s.result.tables = printed_tables(output)
    if missing:
        s.record(timm=missing)
    return payload


@step("bench-train", "bench/bench_train.py: ours vs timm, NCHW and NHWC, with peak memory", 120, 90)
def bench_train_step(s: StepRun) -> None:
    payload = _bench(s, "bench/bench_train.py", "ours,timm", "ours,ours+nhwc,timm,timm+nhwc",
                     ["--precision", "amp", "--batch-sizes", s.sizes.bench_batch, "--warmup", "3", "--repeats", "10"])
    rows = {f"{r['model']} bs{r['batch_size']}": {"img_per_s": r["img_per_s"], "step_ms": r["step_ms_median"],
                                                   "peak_memory_mib": r["peak_memory_mib"]} for r in payload["results"]}
    ratios = {f"{r['ours']} / {r['peer']}": r.get("paired_ratio") for r in payload["ratios"]}
    s.record(results=rows, paired_ratios=ratios)
    s.note(", ".join(f"{name.split()[0]} {row['img_per_s']:.1f}" for name, row in rows.items()) + " img/s")


@step("bench-infer", "bench/bench_inference.py: ours vs timm, latency and peak memory", 90, 90)
def bench_infer_step(s: StepRun) -> None:
    payload = _bench(s, "bench/bench_inference.py", "ours,timm", "ours,ours+nhwc,timm+nhwc",
                     ["--precision", "amp", "--batch-sizes", f"1,{s.sizes.bench_batch}", "--warmup", "5",
                      "--repeats", "20"])
    rows = {f"{r['model']} bs{r['batch_size']}": {"img_per_s": r["img_per_s"], "p50_ms": r["latency_ms_p50"],
                                                   "p99_ms": r["latency_ms_p99"],
                                                   "peak_memory_mib": r["peak_memory_mib"]} for r in payload["results"]}
    s.record(results=rows, paired_ratios={f"{r['ours']} / {r['peer']} bs{r['batch_size']}": r.get("paired_ratio")
                                          for r in payload["ratios"]})
    largest = max(r["batch_size"] for r in payload["results"])
    s.note(", ".join(f"{name.split()[0]} {row['img_per_s']:.1f}" for name, row in rows.items()
                     if name.endswith(f"bs{largest}")) + f" img/s at bs{largest}")


@step("ddp-gloo", "multiproc.py 2 ranks on one device, --dist-backend gloo, accumulation 2, then a 2-rank --resume",
      120, 150)
def ddp_gloo_step(s: StepRun) -> None:
    z, ws = s.sizes, s.workspace()
    world = 2
    flags = [*_train_flags(s, ws), "--data-backend", "pytorch", *z.amp, "--dist-backend", "gloo",
             "--optimizer-batch-size", 2 * world * z.batch, "--epochs", 2]
    s.command("multiproc.py", "--nproc_per_node", world, "--master_port", free_port(), "main.py", *flags,
              "--run-epochs", 1)
    s.expect((ws / "checkpoint.pth.tar").is_file(), f"the 2-rank run wrote no {ws / 'checkpoint.pth.tar'}")
    output = s.command("multiproc.py", "--nproc_per_node", world, "--master_port", free_port(), "main.py", *flags,
                       "--resume", ws / "checkpoint.pth.tar")
    _check_resumed(s, output, ws / "checkpoint.pth.tar", 1, ws, 2)
    report = read_report(ws / "raport.json")
    placement = parameters(report)
    if "world_size" in placement:  # main.py logs the placement it ran with
        s.expect(placement["world_size"] == world and placement.get("distributed") is True,
                 f"the report says world_size {placement['world_size']}, distributed {placement.get('distributed')}")
    records = epoch_records(report)
    metrics = {"world_size": world, "optimizer_batch_size": 2 * world * z.batch,
               "train.total_ips per epoch": [number(data, "train.total_ips") for _, data in records],
               "val.top1 per epoch": [number(data, "val.top1") for _, data in records]}
    s.record(**metrics)
    s.note(f"2 ranks, accumulation 2, resumed at epoch 1; {metrics['train.total_ips per epoch'][-1]:.1f} img/s "
           "(both ranks)")


@step("ddp-nccl", "multiproc.py 1 rank with --dist-backend nccl and --sync-bn; a 1-rank NCCL all_reduce", 90, 60)
def ddp_nccl_step(s: StepRun) -> None:
    s.need_gpu("NCCL needs CUDA GPUs")
    z, ws = s.sizes, s.workspace()
    # --sync-bn (CUDA only; tests/test_training_options.py checks the CPU's refusal): its conversion, forward and
    # backward on the GPU, and checkpoints of it. Statistics are synchronised between ranks, which NCCL gives only
    # with a GPU per rank.
    s.command("multiproc.py", "--nproc_per_node", 1, "--master_port", free_port(), "main.py",
              *_train_flags(s, ws), "--data-backend", "pytorch", *z.amp, "--dist-backend", "nccl", "--sync-bn",
              "--epochs", 1)
    report = read_report(ws / "raport.json")
    s.expect(parameters(report).get("sync_bn") is True, "the report's parameters do not say sync_bn true")
    epoch = last_epoch(report)
    output = s.command("bench/gpu_checks.py", "nccl")
    nccl = re.search(r"NCCL (\S+): 1-rank all_reduce correct", output)
    s.expect(nccl is not None, "gpu_checks.py nccl printed no correct all_reduce")
    # One rank: main.py starts no process group (WORLD_SIZE 1), so the run above proves the flag and the launcher;
    # the all_reduce proves NCCL itself.
    s.record(nccl=nccl[1], distributed=parameters(report).get("distributed"),
             **{"train.total_ips": number(epoch, "train.total_ips"), "val.top1": number(epoch, "val.top1")})
    s.note(f"NCCL {nccl[1]} all_reduce ok; 1-rank run {epoch['train.total_ips']:.1f} img/s")


def _no_compile_in_quick_mode(s: StepRun) -> None:
    if s.quick:
        raise StepSkipped(f"{QUICK_ONLY}: torch.compile of b0 takes minutes on 2 CPU cores (tests/test_perf_flags.py "
                          "checks --jit compile on the CPU)")


@step("compile-train", "main.py --jit compile training (synthetic, NHWC)", 150, 60)
def compile_train_step(s: StepRun) -> None:
    _no_compile_in_quick_mode(s)
    z, ws = s.sizes, s.workspace()
    s.command("main.py", "--data-backend", "synthetic", "--jit", "compile", *z.amp, "--memory-format", "nhwc",
              "-b", z.bench_batch, "--image-size", z.bench_image_size, "--prof", z.compile_iterations, "--epochs", 1,
              "--training-only", "--no-checkpoints", "--print-freq", 1, "--workspace", ws, "--raport-file",
              "raport.json", *s.device)
    records = read_report(ws / "raport.json")
    ips = iteration_values(records, "train.total_ips")
    first = iteration_values(records, "train.compute_time")[:1]
    s.expect(len(ips) == z.compile_iterations, f"expected {z.compile_iterations} iteration records, found {len(ips)}")
    eager_ips = s.acceptance.results["launch-train"].metrics.get("steady_ips")
    metrics = {"batch": z.bench_batch, "image_size": z.bench_image_size, "precision": z.precision,
               "iterations": len(ips), "warmup_iterations": 5, "steady_ips": steady(ips, 5),
               "first_step_s": first[0] if first else None, "eager_steady_ips (launch-train)": eager_ips}
    s.record(**metrics)
    s.note(f"{metrics['steady_ips']:.1f} img/s compiled" + (f" vs {eager_ips:.1f} eager" if eager_ips else "")
           + (f", first step (compilation) {first[0]:.0f} s" if first else ""))


@step("compile-eval", "main.py --evaluate --jit compile (frozen) of the trained b0 vs its eager val top-1", 90, 60)
def compile_eval_step(s: StepRun) -> None:
    _no_compile_in_quick_mode(s)
    z, checkpoint, ws = s.sizes, s.checkpoint, s.workspace()
    s.command("main.py", s.data, "--evaluate", "--jit", "compile", "--arch", "efficientnet-b0", "--num_classes",
              z.classes, "--pretrained-from-file", checkpoint, "--data-backend", "pytorch", "--image-size",
              z.image_size, "-b", z.batch, "-j", z.workers, *z.amp, "--memory-format", "nhwc", "--workspace", ws,
              "--raport-file", "raport.json", *s.device)
    frozen = last_epoch(read_report(ws / "raport.json"))
    # model_best holds the weights of the epoch with the best val top-1; the same images at the same batch size.
    trained = epoch_records(read_report(checkpoint.parent / "raport.json"))
    eager_top1 = max(number(data, "val.top1") for _, data in trained)
    frozen_top1 = number(frozen, "val.top1")
    images = z.classes * z.val_per_class
    tolerance = 100.0 * 2 / images  # two images: fp16 rounding of a folded BN may flip a near tie
    s.record(**{"val.top1 frozen": frozen_top1, "val.top1 eager (train-resume's best)": eager_top1,
                "val.compute_ips": number(frozen, "val.compute_ips"),
                "val.first_batch_latency (compilation)": number(frozen, "val.first_batch_latency")})
    s.expect(abs(frozen_top1 - eager_top1) <= tolerance + 1e-9,
             f"frozen val top-1 {frozen_top1:g} % differs from the eager {eager_top1:g} % by more than two images")
    s.note(f"frozen top-1 {frozen_top1:g} % = eager {eager_top1:g} % (within 2 images), "
           f"{frozen['val.compute_ips']:.1f} img/s, first batch {frozen['val.first_batch_latency']:.0f} s")


def _dali(s: StepRun, backend: str, *extra) -> None:
    s.need_module("nvidia.dali")
    z, ws = s.sizes, s.workspace()
    s.command("main.py", *_train_flags(s, ws), "--data-backend", backend, *extra, *z.amp, "--memory-format", "nhwc",
              "--epochs", 1, "--no-checkpoints")
    epoch = last_epoch(read_report(ws / "raport.json"))
    metrics = {key: number(epoch, key) for key in ("train.total_ips", "train.loss", "val.top1", "val.total_ips")}
    s.record(**metrics)
    s.note(f"{metrics['train.total_ips']:.1f} train img/s, {metrics['val.total_ips']:.1f} val img/s")


@step("dali-gpu", "main.py --data-backend dali-gpu, autoaugment, bicubic, one epoch", 90, 60)
def dali_gpu_step(s: StepRun) -> None:
    s.need_gpu("dali-gpu decodes on the GPU")
    _dali(s, "dali-gpu", "--augmentation", "autoaugment", "--interpolation", "bicubic")


@step("dali-cpu", "main.py --data-backend dali-cpu, one epoch", 90, 90)
def dali_cpu_step(s: StepRun) -> None:
    _dali(s, "dali-cpu")


@step("qat", "checkpoint2model.py, then quant_main.py calibration + QAT from the trained b0 via multiproc.py", 120, 150)
def qat_step(s: StepRun) -> None:
    s.need_module("modelopt.torch.quantization")
    z, checkpoint, ws = s.sizes, s.checkpoint, s.workspace()
    weights = ws / "b0_float.pth"
    s.command("checkpoint2model.py", "--checkpoint-path", checkpoint, "--weight-path", weights)
    s.expect(weights.is_file(), f"checkpoint2model.py wrote no {weights}")
    s.command("multiproc.py", "--nproc_per_node", 1, "--master_port", free_port(), "quant_main.py", s.data,
              "--arch", "efficientnet-quant-b0", "--pretrained-from-file", weights, "--num_classes", z.classes,
              "--data-backend", "pytorch", "--image-size", z.image_size, "-b", z.batch, "-j", z.workers,
              "--epochs", 1, "--prof", z.qat_iterations, "--calibration-batches", 2, "--optimizer", "sgd",
              "--lr", "0.001", "--momentum", "0.9", "--print-freq", 1, "--workspace", ws, "--raport-file",
              "raport.json", *s.device)
    s.expect((ws / "quantized_checkpoint.pth.tar").is_file(), f"quant_main.py wrote no "
                                                               f"{ws / 'quantized_checkpoint.pth.tar'}")
    records = read_report(ws / "raport.json")
    calibration = next((data for step_, data in records if isinstance(step_, list) and step_[:1] == ["Calibration"]),
                       None)
    s.expect(calibration is not None, "the QAT report has no Calibration record (calib.*)")
    epoch = last_epoch(records)
    step_s = iteration_values(records, "train.compute_time")
    metrics = {"calibration": calibration, "train.loss": number(epoch, "train.loss"),
               "train.total_ips": number(epoch, "train.total_ips"), "iterations": len(step_s),
               "step_s": steady(step_s, 1), "val.top1": number(epoch, "val.top1")}
    s.record(**metrics)
    s.note(f"calibrated, {len(step_s)} QAT steps of {1e3 * steady(step_s, 1):.0f} ms, val top-1 "
           f"{metrics['val.top1']:g} %")


# --- command line -------------------------------------------------------------------------------------------

def parse_timeouts(items: list[str]) -> dict[str, float]:
    timeouts = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in {s.name for s in STEPS}:
            raise argparse.ArgumentTypeError(f"--step-timeout {item}: unknown step {name!r}")
        try:
            timeouts[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--step-timeout {item}: {value!r} is not a number of seconds") from None
    return timeouts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_gpu.sh", description=__doc__.split("\n\n")[0],
                                epilog="steps: " + ", ".join(s.name for s in STEPS))
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="where the summary, logs, data and workspaces go")
    p.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1",
                   help="the same steps on the CPU at toy sizes, GPU-only steps skipped (also QUICK=1)")
    p.add_argument("--steps", default=None, metavar="A,B",
                   help="run only these steps (the others are SKIP); steps whose inputs a previous run in OUT_DIR "
                        "left (data, the trained checkpoint) use them")
    p.add_argument("--step-timeout", action="append", default=[], metavar="STEP=SECONDS",
                   help="another timeout for a step (repeatable), e.g. compile-train=300 on a slower host")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="no step starts after this many seconds and none runs past it (default: 470, which with the 10 s a "
                        "timed-out step gets to stop keeps the run within 8 minutes; quick: 900)")
    return p


def main(argv: list[str] | None = None, runner: Runner = run_process) -> int:
    """Run the acceptance steps; 0 when none failed, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        timeouts = parse_timeouts(args.step_timeout)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    selected = None
    if args.steps:
        selected = [name.strip() for name in args.steps.split(",") if name.strip()]
        unknown = sorted(set(selected) - {s.name for s in STEPS})
        if unknown:
            parser.error(f"--steps: unknown {', '.join(unknown)}; steps: {', '.join(s.name for s in STEPS)}")
    acceptance = Acceptance(args.out, quick=args.quick, runner=runner, budget_s=args.budget, timeouts=timeouts)
    print(f"GPU acceptance run ({'quick, CPU' if args.quick else 'GPU'}), {acceptance.python}, into {acceptance.out}",
          flush=True)
    acceptance.run(selected)
    acceptance.print_table()
    return 1 if acceptance.overall() == FAIL else 0


if __name__ == "__main__":
    raise SystemExit(main())
