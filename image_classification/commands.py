"""The entry points' main functions. The top-level scripts (`python main.py ...`) and the console scripts that
`pip install -e .` puts on the PATH (`efficientnet-train ...`) call the same ones:

    main.py             efficientnet-train                train_main
    quant_main.py       efficientnet-quant-train          quant_train_main
    launch.py           efficientnet-launch               launcher.main
    multiproc.py        efficientnet-multiproc            multiproc.main
    classify.py         efficientnet-classify             deploy.classify.main
    model2onnx.py       efficientnet-export               deploy.export.main
    checkpoint2model.py efficientnet-checkpoint2model     deploy.export_weights.main

The training mains return the run summary (tests and the Python API read it); the console scripts turn it into
the exit status (cli.exit_status). Errors name the script as it was called.
"""
from __future__ import annotations

import argparse
import sys

from .cli import ArgumentParser, exit_status, run_cli

# The reference's name of quant_main.py's latest checkpoint: quantized_<--checkpoint-filename>.
CHECKPOINT_PREFIX = "quantized_"


def train_main(argv: list[str] | None = None, prog: str = "main.py") -> dict:
    """main.py: parse the flags and train (or --evaluate) through the Python API; bad input is one error line and
    exit status 1."""
    from . import api
    from .arguments import parse_config
    return run_cli(prog, lambda: api.train(parse_config(argv, prog=prog)))


def quant_parser(prog: str = "quant_main.py") -> argparse.ArgumentParser:
    """quant_main.py's own flags (calibration), parsed together with main.py's."""
    from .toolkit.quantization import add_arguments
    return add_arguments(ArgumentParser(prog=prog, add_help=False, allow_abbrev=False))


def quant_parse_args(argv: list[str] | None = None, prog: str = "quant_main.py") -> argparse.Namespace:
    """main.py's arguments (and the arch's model flags) together with the quantization flags."""
    from .arguments import parse_args
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = quant_parser(prog)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
    return parse_args(argv, prog=prog, extra=[parser])


def quant_parse_config(argv: list[str] | None = None, prog: str = "quant_main.py"):
    """The job's Config: main.py's and the quantization flags, with quantized_-prefixed checkpoints."""
    from .config import Config
    return Config.from_args(quant_parse_args(argv, prog), checkpoint_prefix=CHECKPOINT_PREFIX)


def quant_train_main(argv: list[str] | None = None, prog: str = "quant_main.py") -> dict:
    """quant_main.py: parse, then calibrate and train (or --evaluate) through the Python API."""
    from . import api
    return run_cli(prog, lambda: api.quant_train(quant_parse_config(argv, prog)))


# --- console scripts: each calls the script's main and returns its exit status ---------------------------------

def train_script() -> int:
    """efficientnet-train: main.py."""
    return exit_status(train_main(prog="efficientnet-train"))


def quant_train_script() -> int:
    """efficientnet-quant-train: quant_main.py."""
    return exit_status(quant_train_main(prog="efficientnet-quant-train"))


def launch_script() -> int:
    """efficientnet-launch: launch.py."""
    from .launcher import main
    return exit_status(main())
