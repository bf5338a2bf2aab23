"""launch.py: run main.py's job with the defaults configs.yml gives a model × platform × precision × mode.

    python launch.py --model efficientnet-b0 --precision AMP --mode convergence --platform DGXA100 /imagenet
    python multiproc.py --nproc_per_node 8 launch.py --model efficientnet-b4 --precision TF32 \\
        --mode benchmark_inference --platform DGXA100 /imagenet -b 64 --raport-file raport_64.json
    python launch.py --model efficientnet-b0 --precision FP32 --mode benchmark_training_short --platform CPU

The sections precision[P], platform[X], models[M][X][P] and mode[MODE] are merged in that order (later
wins, as the reference does) and become parser defaults of main.py; flags after them override.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .cli import ArgumentParser, UserError, main_process, run_cli

PROG = "launch.py"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs.yml"
SECTIONS = ("precision", "platform", "models", "mode")


class ConfigError(UserError):
    """A configs.yml that cannot be read, or a combination it does not hold; the message lists what exists."""


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    """configs.yml as a dict (YAML anchors and merge keys resolved)."""
    try:
        stat = Path(path).stat()
    except OSError as err:
        raise ConfigError(f"--cfg_file {path}: cannot read ({err.strerror or err})") from None
    return copy.deepcopy(_parse_config(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _parse_config(path: str, mtime_ns: int, size: int) -> dict:
    # Cached per file version: the recipe and config tests resolve hundreds of command lines.
    import yaml
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--cfg_file {path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    try:
        config = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise ConfigError(f"--cfg_file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    missing = [s for s in SECTIONS if not isinstance((config or {}).get(s), Mapping)]
    if missing:
        raise ConfigError(f"--cfg_file {path}: has no {', '.join(missing)} section(s)")
    return config


def cpu_workers_limit() -> int:
    """Data workers a CPU run may use: half the cores available to this process (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def _pick(section: Mapping, key: str, what: str, flag: str) -> Mapping:
    if key not in section:
        raise ConfigError(f"unknown {flag} {key!r}{what}; available: {', '.join(sorted(section))}")
    return section[key] or {}


def available_configurations(config: Mapping) -> list[tuple[str, str, str]]:
    """Every (model, platform, precision) entry of the config, in file order."""
    return [(model, platform, precision) for model, platforms in config["models"].items()
            for platform, precisions in (platforms or {}).items() for precision in (precisions or {})]


def resolve_defaults(model: str, precision: str, mode: str, platform: str, config: Mapping) -> dict:
    """main.py defaults of one combination: precision, platform, model entry, mode merged (later wins)."""
    _pick(config["precision"], precision, "", "--precision")
    _pick(config["platform"], platform, "", "--platform")
    _pick(config["mode"], mode, "", "--mode")
    platforms = _pick(config["models"], model, "", "--model")
    if platform not in platforms:
        raise ConfigError(f"{model} has no entry for --platform {platform}; its platforms: "
                          + "; ".join(f"{p} ({', '.join(precs)})" for p, precs in platforms.items()))
    precisions = platforms[platform] or {}
    if precision not in precisions:
        raise ConfigError(f"{model} on {platform} has no --precision {precision}; available: "
                          f"{', '.join(precisions)}")
    merged: dict = {}
    for section in (config["precision"][precision], config["platform"][platform], precisions[precision],
                    config["mode"][mode]):
        merged.update(section or {})
    if merged.get("device") == "cpu" and "workers" in merged:
        # On the CPU the loader workers share the cores with the model's compute threads.
        merged["workers"] = min(int(merged["workers"]), cpu_workers_limit())
    return merged


def build_parser() -> argparse.ArgumentParser:
    """launch.py's own flags; everything else is passed to main.py's parser."""
    p = ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                description="Run main.py with the defaults of configs.yml; other flags are "
                                            "main.py's and override those defaults.")
    p.add_argument("-h", "--help", action="store_true", help="show this help and main.py's flags, then exit")
    p.add_argument("--cfg_file", default=str(DEFAULT_CONFIG), metavar="PATH",
                   help="configuration file (default: configs.yml next to launch.py)")
    p.add_argument("--model", default=None, help="a model of configs.yml, e.g. efficientnet-b0")
    p.add_argument("--precision", default=None, help="AMP, FP32 or TF32, as the model's platform entry offers")
    p.add_argument("--mode", default=None,
                   help="convergence, benchmark_training, benchmark_training_short, benchmark_inference, evaluate")
    p.add_argument("--platform", default=None, help="e.g. DGXA100, DGXH100, T4, CPU")
    return p


def build_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """main.py's arguments for a launch.py command line, without running anything.

    A combination configs.yml does not hold exits with status 2 (a bad command line); a --cfg_file that cannot
    be read raises ConfigError (bad input: status 1 from launch.py).
    """
    return _build(argv)[0]


def _build(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict, list[str]]:
    """(main.py's arguments, the configuration's defaults, the command-line flags after launch.py's own)."""
    from .arguments import parse_args
    from .config_file import ConfigFileError
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known, rest = parser.parse_known_args(argv)
    if known.help:
        parser.print_help()
        print()
        parse_args(["-h"])  # main.py's flags; exits
    config_names = ("--model", known.model), ("--precision", known.precision), ("--mode", known.mode), \
        ("--platform", known.platform)
    missing = [flag for flag, value in config_names if value is None]
    config = load_config(known.cfg_file)
    try:
        if missing:
            raise ConfigError(f"{' '.join(missing)} required; models: {', '.join(config['models'])}; "
                              f"platforms: {', '.join(config['platform'])}; precisions: "
                              f"{', '.join(config['precision'])}; modes: {', '.join(config['mode'])}")
        defaults = resolve_defaults(known.model, known.precision, known.mode, known.platform, config)
        return parse_args(rest, defaults=defaults, prog=PROG), defaults, rest
    except ConfigFileError:
        raise  # a --config file is input, as for main.py: one error line, status 1
    except ValueError as err:  # ConfigError, or a config key that is not a main.py flag
        parser.error(str(err))


def fit_to_cpu(args: argparse.Namespace, defaults: Mapping, argv: Sequence[str]) -> list[str]:
    """A GPU platform's settings on a run without a GPU (a DGX recipe tried on a laptop or a CPU node): the ones that
    cannot run or would crowd a CPU are changed, unless the command line itself asked for them. Returns one note
    per change: dali-gpu decodes on the GPU (dali-cpu runs the same pipeline on the CPU), and loader workers
    share the cores with the compute threads (at most half the cores, as the CPU platform's). gpu_affinity is
    left to the run, which ignores it with a warning on a CPU."""
    from .context import select_device
    try:
        if select_device(None if args.device == "auto" else args.device).type != "cpu":
            return []
    except ValueError:
        return []  # a device this machine lacks: the run itself says so
    given = {token.split("=", 1)[0] for token in argv if token.startswith("-")}
    notes = []
    if defaults.get("data_backend") == "dali-gpu" and "--data-backend" not in given:
        notes.append("data_backend dali-gpu of this platform decodes on the GPU; dali-cpu on this CPU run")
        args.data_backend = "dali-cpu"
    if "workers" in defaults and not given & {"-j", "--workers"} and args.workers > cpu_workers_limit():
        notes.append(f"workers {args.workers} of this platform: {cpu_workers_limit()} on this CPU run (half the "
                     "cores, which the model's compute threads share)")
        args.workers = cpu_workers_limit()
    return notes


def main(argv: Sequence[str] | None = None) -> dict:
    """launch.py: build main.py's arguments from configs.yml and the command line, say which main.py command they
    make, then run the job in-process."""
    from . import api
    from .arguments import command_line
    from .config import Config
    args, defaults, rest = run_cli(PROG, _build, argv)
    notes = fit_to_cpu(args, defaults, rest)
    if main_process():  # every process of a multiproc.py launch resolves the same line
        for note in notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
        print(f"{PROG}: {shlex.join(['main.py', *command_line(args)])}", flush=True)
    return run_cli(PROG, lambda: api.train(Config.from_args(args)))
