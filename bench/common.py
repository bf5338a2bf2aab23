"""Shared pieces of the bench/ scripts: flags, model entries, interleaved timing, statistics, memory, reports.

Every script measures our code path and the peers' (timm, torchvision) in one process and one sitting, on the
same input tensors, batch size, resolution and precision. Timings are interleaved round by round (ours,
timm, torchvision, ours, ...) so that load from other processes on a shared machine hits all entries alike;
compare the ratios, which are stable, rather than the absolute numbers, which are not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from image_classification.context import (  # noqa: E402
    CPU_ALLOCATORS, ExecutionContext, create_context, set_cpu_allocator)

PEERS = ("timm", "torchvision")
ENGINES = ("onnxruntime", "openvino")  # inference only: the model exported to ONNX and run in that engine
PRECISIONS = ("fp32", "tf32", "bf16", "amp")


# --- model entries ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One measured model: `ours`, `timm` or `torchvision`, with its layout and whether it is compiled.

    Written on the command line as NAME[+nhwc|+nchw][+compile][+freeze][+aten], e.g. `ours+nhwc+compile`;
    +freeze (inference only) compiles with inductor's freezing; +aten (ours only) runs ATen's BN, SiLU and SE
    layers instead of our fused CPU kernels (main.py --cpu-kernels off). A plain `ours` takes --memory-format
    and --compile, a plain peer runs as its users run it by default (NCHW, eager).
    Inference only: NAME+onnxruntime or NAME+openvino exports the model to ONNX and runs it in that engine
    (which chooses its own layout), and ours+ENGINE+int8 runs the Q/DQ export of efficientnet-quant-<arch>.
    """

    name: str
    memory_format: str = "nchw"
    compile: bool = False
    freeze: bool = False  # inference only: inductor's freezing (weights as constants, BN folded into convs)
    engine: str = "torch"  # inference only: onnxruntime or openvino run the model's ONNX export
    int8: bool = False  # with an engine: the QAT model's Q/DQ export (ours only)
    aten: bool = False  # ours only: --cpu-kernels off

    @property
    def label(self) -> str:
        return (self.name + ("+nhwc" if self.memory_format == "nhwc" else "") + ("+compile" if self.compile else "")
                + ("+freeze" if self.freeze else "") + ("" if self.engine == "torch" else f"+{self.engine}")
                + ("+int8" if self.int8 else "") + ("+aten" if self.aten else ""))

    @property
    def configuration(self) -> str:
        """The label without the model's name (nor +aten, which selects our kernels, not a setting): entries of
        equal configuration compare like with like."""
        return self.label.removesuffix("+aten").partition("+")[2] or "default"

    @property
    def is_ours(self) -> bool:
        return self.name == "ours"


def parse_entries(text: str, memory_format: str, compile_ours: bool, allow_freeze: bool = False) -> list[Entry]:
    """Entries of a --models value (comma separated); errors name the valid spellings."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, *options = item.split("+")
        if name not in ("ours", *PEERS):
            raise ValueError(f"--models: unknown model {name!r}; use ours, timm or torchvision, optionally with "
                             f"+nhwc, +nchw and +compile (e.g. ours+nhwc+compile)")
        unknown = set(options) - {"nhwc", "nchw", "compile", "freeze", "int8", "aten", *ENGINES}
        if unknown:
            raise ValueError(f"--models: unknown option(s) {sorted(unknown)} in {item!r}; use +nhwc, +nchw, +compile, "
                             f"+freeze, +aten" + (", +onnxruntime, +openvino, +int8" if allow_freeze else ""))
        if "aten" in options and name != "ours":
            raise ValueError(f"--models: +aten ({item!r}) applies to ours only (the peers always run ATen's layers)")
        inference_only = {"freeze", "int8", *ENGINES} & set(options)
        if inference_only and not allow_freeze:
            raise ValueError(f"--models: +{'/+'.join(sorted(inference_only))} ({item!r}) applies to inference only")
        engines = [option for option in options if option in ENGINES]
        if engines:
            if len(engines) > 1 or {"nhwc", "nchw", "compile", "freeze"} & set(options):
                raise ValueError(f"--models: {item!r}: +{engines[0]} runs the ONNX export in one engine, which "
                                 "chooses its own layout; drop the other options")
            if "int8" in options and name != "ours":
                raise ValueError(f"--models: {item!r}: +int8 runs our QAT model (efficientnet-quant-*); "
                                 "peers have none")
            entries.append(Entry(name, engine=engines[0], int8="int8" in options))
            continue
        if "int8" in options:
            raise ValueError(f"--models: {item!r}: +int8 needs an engine, e.g. ours+openvino+int8")
        plain_ours = name == "ours" and not options
        fmt = memory_format if plain_ours else ("nhwc" if "nhwc" in options else "nchw")
        freeze = "freeze" in options
        entries.append(Entry(name, fmt, compile_ours if plain_ours else ("compile" in options or freeze), freeze,
                             aten="aten" in options))
    if not entries:
        raise ValueError("--models: name at least one model")
    return entries


def build_model(entry: Entry, arch: str, num_classes: int = 1000) -> nn.Module:
    """A freshly initialised EfficientNet `arch` (b0, b4, ..., lite0 ... lite4) of our registry, timm or torchvision.

    Lite's peer is timm's tf_efficientnet_lite*: the TF port, with TF's SAME padding as ours (timm's own
    efficientnet_lite* pads symmetrically); torchvision has no EfficientNet-Lite.
    """
    torch.manual_seed(0)
    if entry.name == "ours":
        from image_classification.models import get_entry
        return get_entry(f"efficientnet-{arch}")(num_classes=num_classes)
    if entry.name == "timm":
        import timm
        return timm.create_model(f"{'tf_' if arch.startswith('lite') else ''}efficientnet_{arch}",
                                 num_classes=num_classes)
    if arch.startswith("lite"):
        raise ValueError(f"--archs {arch}: torchvision has no EfficientNet-Lite; compare with timm")
    import torchvision
    return getattr(torchvision.models, f"efficientnet_{arch}")(num_classes=num_classes)


def with_kernels(entry: Entry, fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with our fused CPU kernels on, or off for a +aten entry (they are a process-wide switch)."""
    if not entry.aten:
        return fn

    def run_with_aten():
        from image_classification.models import fused
        fused.set_enabled(False)
        try:
            return fn()
        finally:
            fused.set_enabled(True)
    return run_with_aten


def default_image_size(arch: str) -> int:
    """The arch's own resolution from our registry (224 for b0, 380 for b4)."""
    from image_classification.models import get_entry
    return get_entry(f"efficientnet-{arch}").default_image_size


def maybe_compile(model: nn.Module, entry: Entry) -> nn.Module:
    """torch.compile (inductor) for +compile entries, with freezing for +freeze, the model itself otherwise."""
    from image_classification.train.setup import compile_model
    return compile_model(model, "compile" if entry.compile else "no", frozen=entry.freeze)


# --- flags and context --------------------------------------------------------------------------------------

def add_common_arguments(p: argparse.ArgumentParser, *, default_models: str, default_batch_sizes: str) -> None:
    """The flags every bench script shares."""
    p.add_argument("--quick", action="store_true",
                   help="tiny run that only checks the script works (image 32, batch 2 unless given, 1 warm-up, 2 "
                        "repeats)")
    p.add_argument("--archs", default="b0",
                   help="comma-separated EfficientNet members, e.g. b0,b4 or lite0 (default: b0)")
    p.add_argument("--models", default=default_models,
                   help="comma-separated entries NAME[+nhwc|+nchw][+compile][+freeze], NAME one of ours, timm, torchvision "
                        "(default: %(default)s)")
    p.add_argument("--batch-sizes", default=default_batch_sizes, help="comma-separated (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the arch's own)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (true float32: TF32 off on GPUs); tf32 = float32 with TF32 convolutions and matmuls "
                        "on Ampere and newer GPUs (fp32 on a CPU); bf16 = bf16 autocast (CPU); amp = the device's "
                        "--amp (fp16 on GPU, bf16 on CPU)")
    p.add_argument("--memory-format", default="nchw", choices=("nchw", "nhwc"),
                   help="layout of the plain `ours` entries (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the plain `ours` entries")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per entry (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--cpu-allocator", default="retain", choices=CPU_ALLOCATORS,
                   help="main.py's --cpu-allocator, for every entry alike: it is the process's (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--quick: the smallest run that exercises every code path; sizes given on the command line still win."""
    if not args.quick:
        return
    if args.batch_sizes == parser.get_default("batch_sizes"):
        args.batch_sizes = "2"
    if args.image_size is None:
        args.image_size = 32
    args.warmup = 1
    args.repeats = 2


def csv_list(text: str, kind: type = str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def context_from_args(args: argparse.Namespace) -> ExecutionContext:
    """Our ExecutionContext for the run: device, autocast dtype and memory format as main.py would set them."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = create_context(device=None if args.device == "auto" else args.device,
                         amp=args.precision not in ("fp32", "tf32"), memory_format=args.memory_format,
                         allow_tf32=args.precision != "fp32")
    if args.precision == "bf16" and ctx.is_cuda:
        raise ValueError("--precision bf16 is the CPU autocast; on GPU use --precision amp (fp16 with loss scaling)")
    if not ctx.is_cuda:
        set_cpu_allocator(args.cpu_allocator)
    return ctx


def context_for(ctx: ExecutionContext, entry: Entry) -> ExecutionContext:
    """`ctx` with the entry's memory format."""
    from dataclasses import replace
    fmt = torch.channels_last if entry.memory_format == "nhwc" else torch.contiguous_format
    return replace(ctx, memory_format=fmt)


# --- timing -------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], ctx: ExecutionContext) -> float:
    """Seconds of one call, the device drained before and after."""
    ctx.synchronize()
    start = time.perf_counter()
    fn()
    ctx.synchronize()
    return time.perf_counter() - start


def warm_up(fn: Callable[[], object], ctx: ExecutionContext, iterations: int) -> float:
    """Seconds of the first call (it includes torch.compile's compilation), then more untimed calls."""
    first = timed(fn, ctx)
    for _ in range(iterations - 1):
        fn()
    return first


def interleaved(fns: dict[str, Callable[[], object]], ctx: ExecutionContext, repeats: int,
                calls_per_sample: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled round by round in a rotating order.

    A sample is the mean over `calls_per_sample` back-to-back calls; rotating the order keeps any entry from
    always following the same neighbour (caches, allocator state).
    """
    samples: dict[str, list[float]] = {key: [] for key in fns}
    keys = list(fns)
    for round_index in range(repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            fn = fns[key]
            samples[key].append(timed(lambda: [fn() for _ in range(calls_per_sample)], ctx) / calls_per_sample)
    return samples


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- memory -------------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block of work: the most bytes of tensors live at once, in MiB above what was live when
    it started.

    On CUDA: the caching allocator's peak. On CPUs: the running sum of the allocations and frees that
    torch.profiler records (profile_memory=True) while the block runs; that counts every buffer PyTorch's CPU
    allocator hands out (tensors, oneDNN's scratch and reordered weights) and nothing of how the C library
    keeps its heap, so it is the same number whichever --cpu-allocator the process uses. The profiler slows
    the block down, which is why timings are taken before, never inside, this block.
    """

    def __init__(self, ctx: ExecutionContext):
        self.ctx = ctx
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.ctx.is_cuda:
            torch.cuda.synchronize(self.ctx.device)
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
            self._start = torch.cuda.memory_allocated(self.ctx.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.ctx.is_cuda:
            torch.cuda.synchronize(self.ctx.device)
            self.mib = (torch.cuda.max_memory_allocated(self.ctx.device) - self._start) / 2**20
            return
        self._profiler.__exit__(*exc)
        self.mib = peak_live_bytes(self._profiler.profiler.kineto_results.events()) / 2**20


def peak_live_bytes(events) -> int:
    """The highest running total of the profiler's `[memory]` events' sizes (allocations positive, frees
    negative) in the order they happened."""
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
    return peak


# --- reports ------------------------------------------------------------------------------------------------

def machine_info(ctx: ExecutionContext) -> dict:
    """What the numbers were measured on: CPU, threads, device, library versions."""
    import torchvision
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = sorted(present & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
                break
    except OSError:
        pass
    info = {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(ctx.device),
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.is_cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm_version,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return info


def settings(args: argparse.Namespace, ctx: ExecutionContext) -> dict:
    """The run's flags as plain JSON values, plus the autocast dtype actually used."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out["autocast_dtype"] = str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else None
    return out


def ratios(rows: list[dict], key: str, group: tuple[str, ...]) -> list[dict]:
    """For each group of rows (same arch, batch, ...): every `ours*` entry's `key` divided by each peer's.

    Where rows carry `samples_s` (seconds per call, one per interleaved round), also the paired ratio: the
    median over rounds of peer seconds / ours seconds in the same round. A shared machine drifts by more than
    the few percent being compared; within one round both entries meet the same drift, so this ratio is the
    steadier of the two.
    """
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[g] for g in group), []).append(row)
    for rows_of_group in groups.values():
        ours = [r for r in rows_of_group if r["model"].startswith("ours")]
        peers = [r for r in rows_of_group if not r["model"].startswith("ours")]
        for o in ours:
            for p in peers:
                if o.get(key) and p.get(key):
                    ratio = {**{g: o[g] for g in group}, "ours": o["model"], "peer": p["model"],
                             f"{key}_ratio": round(o[key] / p[key], 4)}
                    if o.get("samples_s") and p.get("samples_s"):
                        paired = [b / a for a, b in zip(o["samples_s"], p["samples_s"])]
                        ratio["paired_ratio"] = round(median(paired), 4)
                    out.append(ratio)
    return out


def best_ratios(rows: list[dict], key: str, group: tuple[str, ...]) -> list[dict]:
    """Per group and per precision of ours: our fastest entry against the peers' fastest (by `key`), with the
    paired ratio where both carry `samples_s`; the first comparison to read, best configuration against best."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[g] for g in group), []).append(row)
    for rows_of_group in groups.values():
        peers = [r for r in rows_of_group if not r["model"].startswith("ours")]
        if not peers:
            continue
        peer = max(peers, key=lambda r: r[key])
        for precision in dict.fromkeys(r["precision"] for r in rows_of_group if r["model"].startswith("ours")):
            ours = max((r for r in rows_of_group if r["model"].startswith("ours") and r["precision"] == precision),
                       key=lambda r: r[key])
            out.append(_ratio(ours, peer, key, group))
    return out


def same_config_ratios(rows: list[dict], key: str, group: tuple[str, ...]) -> list[dict]:
    """Every `ours*` entry against each peer run in the same configuration (layout, compile/freeze, engine)."""
    out = []
    for o in rows:
        if not o["model"].startswith("ours"):
            continue
        for p in rows:
            if (not p["model"].startswith("ours") and p["configuration"] == o["configuration"]
                    and all(p[g] == o[g] for g in group)):
                out.append(_ratio(o, p, key, group))
    return out


def _ratio(ours: dict, peer: dict, key: str, group: tuple[str, ...]) -> dict:
    ratio = {**{g: ours[g] for g in group}, "ours": ours["model"], "peer": peer["model"],
             f"{key}_ratio": round(ours[key] / peer[key], 4)}
    if ours.get("samples_s") and peer.get("samples_s"):
        ratio["paired_ratio"] = round(median([b / a for a, b in zip(ours["samples_s"], peer["samples_s"])]), 4)
    return ratio


RATIO_COLUMNS = [("arch", "arch", ""), ("batch_size", "batch", "d"), ("ours", "ours", ""), ("peer", "peer", ""),
                 ("img_per_s_ratio", "ours/peer", ".3f"), ("paired_ratio", "paired", ".3f")]
RATIO_TITLE = "throughput ratios (ours / peer, same run; paired: median of per-round ratios)"


def print_ratio_tables(report: dict) -> None:
    """The comparisons to read first: best against best, then each of our entries against the same-run peers."""
    print_table(report["best_ratios"], RATIO_COLUMNS,
                "best vs best: our fastest entry per precision / the peers' fastest (paired: per round)")
    print_table(report["same_config_ratios"], RATIO_COLUMNS,
                "same configuration: each of our entries / the peers' entry run the same way")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str) -> None:
    """A fixed-width table: columns are (key, header, format)."""
    print(f"\n{title}")
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else format(row[k], fmt) for k, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Path | None, payload: dict) -> None:
    """Print nothing; write `payload` to `path` when given (parent folders created)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def entry_record(entry: Entry) -> dict:
    return {"model": entry.label, "configuration": entry.configuration,
            **{k: v for k, v in asdict(entry).items() if k != "name"}}
