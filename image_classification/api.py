"""The suite from Python: train, evaluate and classify as main.py, quant_main.py and classify.py do, which call
these same functions.

    from image_classification import api

    # A run: a main.py command line, a Config, or keyword settings (keys as in a --config file)
    summary = api.train(["/data/flowers", "--arch", "efficientnet-b0", "--epochs", "10", "--workspace", "ws"])
    summary = api.train(api.config("/data/flowers", arch="efficientnet-b0", epochs=10, workspace="ws",
                                   weight_decay=1e-5, num_classes=102))
    summary = api.train(api.config(argv=["--config", "ws/config.yaml", "--workspace", "ws2"]))  # repeat a run
    print(summary["val.top1"], summary["best_prec1"])

    metrics = api.evaluate(api.config("/data/flowers", arch="efficientnet-b0", num_classes=102,
                                      pretrained_from_file="ws/model_best.pth.tar"))

    for prediction in api.classify(["cat.jpg"], arch="efficientnet-b0", pretrained_from_file="ws/model_best.pth.tar",
                                   num_classes=102, class_names="ws/classes.txt"):
        print(prediction.path, prediction.top)          # [(class name, probability in 0..1), ...] best first

A summary holds the run summary's metrics (best val.top1, lowest losses, mean speeds; the report's step []
record), plus best_prec1, epoch (the next epoch to run) and interrupted (a signal stopped the run). Input the user
can fix raises cli.UserError (a ValueError) with the one-line message the scripts print; a bad command line
passed as argv exits as the script would (SystemExit 2, the message on stderr).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import Config


def config(data: str | None = None, *, argv: Sequence[str] = (), **settings) -> Config:
    """A main.py job's Config: `settings` keyed as in a --config file (weight_decay or weight-decay, model flags
    such as num_classes too), under the flags of `argv` (a main.py command line, which may name a --config file)."""
    from .arguments import parse_config
    if data is not None:
        settings["data"] = str(data)
    return parse_config(list(argv), settings=settings)


def _config(config_or_argv: Config | Sequence[str] | None) -> Config:
    if isinstance(config_or_argv, Config):
        return config_or_argv
    from .arguments import parse_config
    return parse_config(None if config_or_argv is None else list(config_or_argv))


def train(config_or_argv: Config | Sequence[str] | None = None) -> dict:
    """Train (or, with --evaluate, evaluate) as main.py does; returns the run summary (see the module docstring).
    None parses the process's command line."""
    from .train import run
    return run(_config(config_or_argv))


def evaluate(config_or_argv: Config | Sequence[str] | None = None) -> dict:
    """Validate the job's model once (main.py --evaluate) and return the summary of that validation."""
    from .train import run
    return run(_config(config_or_argv).replace(evaluate=True))


def quant_train(config_or_argv: Config | Sequence[str] | None = None) -> dict:
    """Calibrate, then quantization-aware training of an efficientnet-quant-* model, as quant_main.py does (a
    Config from commands.quant_parse_config, or quant_main.py's command line)."""
    from .commands import quant_parse_config
    from .toolkit.quantization import calibration_hook
    from .train import run
    job = config_or_argv if isinstance(config_or_argv, Config) else quant_parse_config(
        None if config_or_argv is None else list(config_or_argv))
    return run(job, prepare_model=calibration_hook)


def classify(images: Sequence[str | Path], **flags) -> list:
    """Top-5 predictions (deploy.classify.Prediction, or the ImageError of an image that cannot be read) of each
    image, with classify.py's flags as keywords: arch, pretrained_from_file, pretrained, num_classes, class_names,
    image_size, precision ("FP32" by default here; "AMP"), cpu, tta, engine, onnx, interpolation, and the arch's
    other model flags."""
    from .config_file import settings_to_argv
    from .deploy.classify import build_classifier, build_parser, parse_args
    from .models import available_models, get_entry
    flags.setdefault("precision", "FP32")
    parsers = [build_parser()]
    if flags.get("arch") in available_models():
        parsers.append(get_entry(flags["arch"]).parser())
    argv = ["--image", *map(str, images), *settings_to_argv(flags, "classify", parsers)]
    return list(build_classifier(parse_args(argv)).predict_all(list(map(str, images))))
