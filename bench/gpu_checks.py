#!/usr/bin/env python3
"""In-process checks of the GPU acceptance run (bench/run_gpu.sh), each one command of bench/gpu_acceptance.py.

    python bench/gpu_checks.py env --json env.json [--device cpu]    # versions, GPU, TF32, affinity, fp32 depthwise
    python bench/gpu_checks.py peak-memory peak.json launch.py ...    # run a script in-process, write its CUDA peak
    python bench/gpu_checks.py nccl                                   # a 1-rank NCCL group: init, all_reduce, destroy

They import torch (gpu_acceptance.py itself does not, so that it reports a broken install as a failed step
instead of failing as a whole).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

AFFINITY_MODE = "socket_unique_contiguous"  # the DGX platforms' --gpu-affinity in configs.yml


# --- env ----------------------------------------------------------------------------------------------------

def module_version(name: str, version_of: str | None = None) -> str:
    """`name`'s version (of package `version_of` when given), or 'absent (<why it does not import>)'."""
    try:
        module = importlib.import_module(name)
        if version_of:
            module = importlib.import_module(version_of)
    except Exception as err:  # noqa: BLE001 -- any import failure means the feature is unavailable
        return f"absent ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return str(getattr(module, "__version__", "unknown version"))


def versions() -> dict[str, str]:
    """Python and every library the suite's GPU paths use."""
    import platform
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": module_version("torchvision"),
        "timm": module_version("timm"),
        "onnx": module_version("onnx"),
        "onnxruntime": module_version("onnxruntime"),
        "dali": module_version("nvidia.dali"),
        "modelopt": module_version("modelopt.torch.quantization", "modelopt"),
    }


def gpu_info() -> dict:
    """GPU 0's name and memory, CUDA and cuDNN versions."""
    import torch.distributed as dist
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "absent",
    }


def tf32_flags() -> dict[str, bool]:
    return {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def tf32_check() -> tuple[dict, list[str]]:
    """TF32 flags as torch starts and as main.py sets them with and without --no-tf32; and what is wrong."""
    from image_classification.context import create_context
    report = {"torch_default": tf32_flags()}
    create_context(device="cuda", allow_tf32=True)
    report["main.py"] = tf32_flags()
    create_context(device="cuda", allow_tf32=False)
    report["main.py --no-tf32"] = tf32_flags()
    problems = []
    if not all(report["main.py"].values()):
        problems.append(f"main.py leaves TF32 off: {report['main.py']}")
    if any(report["main.py --no-tf32"].values()):
        problems.append(f"--no-tf32 leaves TF32 on: {report['main.py --no-tf32']}")
    return report, problems


def affinity_check() -> tuple[dict, list[str]]:
    """The cores --gpu-affinity socket_unique_contiguous would pin GPU 0's process to, computed as main.py does
    (nothing is pinned here), beside the cores this process may use."""
    from image_classification import gpu_affinity
    from image_classification.context import create_context
    allowed = sorted(os.sched_getaffinity(0))
    report: dict = {"sched_getaffinity": cpulist_text(allowed)}
    try:
        local = [gpu_affinity._local_cpus(pci) for pci in create_context(device="cuda").pci_bus_ids()]
        wanted = gpu_affinity.affinity_for(AFFINITY_MODE, 0, local)
    except Exception as err:  # noqa: BLE001 -- UserError (sysfs unreadable) or a bug: both are findings
        report["error"] = f"{type(err).__name__}: {err}"
        return report, [f"--gpu-affinity {AFFINITY_MODE}: {report['error']}"]
    pinned = [cpu for cpu in wanted if cpu in set(allowed)]
    report.update({"gpu0_local_cpus": cpulist_text(local[0]), AFFINITY_MODE: cpulist_text(wanted),
                   "would_pin": cpulist_text(pinned) if pinned else "nothing (no allowed core near GPU 0: "
                                                                          "main.py warns and leaves affinity)"})
    return report, []


def cpulist_text(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sysfs cpulist form)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def depthwise_calls(device: str, dtype: torch.dtype) -> dict[str, int]:
    """Calls of depthwise_conv_bn_act and of its fp32 convolution (_Fp32Conv) in one b0 training forward and
    backward under `device`'s autocast at `dtype`."""
    from image_classification.models import common, efficientnet, get_entry
    counts = {"depthwise_conv_bn_act": 0, "_Fp32Conv": 0}
    depthwise, fp32_apply = efficientnet.depthwise_conv_bn_act, common._Fp32Conv.apply

    def counting_depthwise(layer, x):
        counts["depthwise_conv_bn_act"] += 1
        return depthwise(layer, x)

    def counting_fp32(*args):
        counts["_Fp32Conv"] += 1
        return fp32_apply(*args)

    efficientnet.depthwise_conv_bn_act = counting_depthwise
    common._Fp32Conv.apply = staticmethod(counting_fp32)
    try:
        torch.manual_seed(0)
        model = get_entry("efficientnet-b0")(num_classes=10).to(device).train()
        images = torch.randn(2, 3, 32, 32, device=device)
        with torch.autocast(device, dtype=dtype):
            loss = model(images).float().square().mean()
        loss.backward()
    finally:
        efficientnet.depthwise_conv_bn_act = depthwise
        common._Fp32Conv.apply = fp32_apply
    return counts


def depthwise_check(cuda: bool) -> tuple[dict, list[str]]:
    """The fp32 depthwise path of models/common.py runs under CPU bf16 autocast (which proves the counting works)
    and never under CUDA fp16 autocast."""
    report, problems = {}, []
    try:
        report["cpu_bf16"] = cpu = depthwise_calls("cpu", torch.bfloat16)
        if not cpu["depthwise_conv_bn_act"] or cpu["_Fp32Conv"] != cpu["depthwise_conv_bn_act"]:
            problems.append(f"CPU bf16 training should run every depthwise conv in fp32; counted {cpu}")
        if cuda:
            report["cuda_fp16"] = gpu = depthwise_calls("cuda", torch.float16)
            if not gpu["depthwise_conv_bn_act"] or gpu["_Fp32Conv"]:
                problems.append(f"CUDA fp16 autocast must never take the CPU fp32 depthwise path; counted {gpu}")
        else:
            report["cuda_fp16"] = "skipped: no GPU"
    except AttributeError as err:  # the hooks counted here moved: the check must be updated, not passed
        problems.append(f"cannot count the depthwise path ({err}); update bench/gpu_checks.py")
    return report, problems


def env_command(args: argparse.Namespace) -> int:
    """Print and write the environment report; exit 1 when a check found a problem (named on stderr)."""
    cuda = args.device != "cpu" and torch.cuda.is_available()
    report: dict = {"versions": versions(), "cuda_available": torch.cuda.is_available()}
    problems: list[str] = []
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("no CUDA GPU visible (torch.cuda.is_available() is False); bench/run_gpu.sh --quick runs "
                        "the CPU version of this acceptance run")
    if cuda:
        report.update(gpu_info())
        for name, check in (("tf32", tf32_check), ("affinity", affinity_check)):
            report[name], found = check()
            problems += found
    else:
        report["tf32"] = report["affinity"] = "skipped: no GPU"
        report["sched_getaffinity"] = cpulist_text(sorted(os.sched_getaffinity(0)))
    report["fp32_depthwise"], found = depthwise_check(cuda)
    problems += found
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for problem in problems:
        print(f"gpu_checks.py env: {problem}", file=sys.stderr)
    return 1 if problems else 0


# --- peak-memory --------------------------------------------------------------------------------------------

def peak_memory_command(args: argparse.Namespace) -> int:
    """Run `script args...` as `python script args...` would, in this process, then write the CUDA caching
    allocator's peaks (allocated and reserved, MiB) to the JSON file; the script's exit status is ours."""
    sys.argv = [args.script, *args.script_args]
    sys.path[0] = str(Path(args.script).resolve().parent)
    status = 0
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            status = code or 0
        else:
            print(code, file=sys.stderr)
            status = 1
    finally:
        peak = {"device": None, "peak_allocated_mib": None, "peak_reserved_mib": None}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            peak = {"device": torch.cuda.get_device_name(device),
                    "peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                    "peak_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(peak) + "\n")
    return status


# --- nccl ---------------------------------------------------------------------------------------------------

def nccl_command(args: argparse.Namespace) -> int:
    """Initialise a one-rank NCCL process group on GPU 0, all-reduce a tensor, destroy the group."""
    import torch.distributed as dist
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        try:
            value = torch.full((4,), 3.0, device="cuda")
            dist.all_reduce(value)
            dist.barrier()
            ok = value.tolist() == [3.0] * 4
        finally:
            dist.destroy_process_group()
    version = ".".join(map(str, torch.cuda.nccl.version()))
    print(f"NCCL {version}: 1-rank all_reduce {'correct' if ok else 'WRONG: ' + str(value.tolist())}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, GPU, TF32 flags, CPU affinity, fp32 depthwise path")
    env.add_argument("--json", type=Path, default=None, help="also write the report here")
    env.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                     help="cuda: a missing GPU is a failure; cpu: only the CPU checks (default: %(default)s)")
    peak = sub.add_parser("peak-memory", help="run a script in-process and write its CUDA memory peaks")
    peak.add_argument("json", type=Path, help="where to write the peaks")
    peak.add_argument("script", help="the script, e.g. launch.py")
    peak.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    sub.add_parser("nccl", help="1-rank NCCL process group: init, all_reduce, destroy")
    args = p.parse_args(argv)
    commands = {"env": env_command, "peak-memory": peak_memory_command, "nccl": nccl_command}
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
