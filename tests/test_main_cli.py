"""main.py's command line: the reference's flags and defaults, model flags, errors, -h, and every recipe."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prefork
from image_classification.arguments import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]

# Spec §1: dest -> default.
REFERENCE_DEFAULTS = {
    "data_backend": "dali-cpu", "interpolation": "bilinear", "arch": "resnet50", "workers": 5, "prefetch": 2,
    "epochs": 90, "run_epochs": -1, "early_stopping_patience": -1, "image_size": None, "batch_size": 256,
    "optimizer_batch_size": -1, "lr": 0.1, "lr_schedule": "step", "end_lr": 0.0, "warmup": 0,
    "label_smoothing": 0.0, "mixup": 0.0, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4,
    "bn_weight_decay": False, "rmsprop_alpha": 0.9, "rmsprop_eps": 1e-3, "nesterov": False, "print_freq": 10,
    "resume": None, "static_loss_scale": 1.0, "prof": -1, "amp": False, "seed": None, "gather_checkpoints": 0,
    "raport_file": "experiment_raport.json", "evaluate": False, "training_only": False, "save_checkpoints": True,
    "jit": "no", "checkpoint_filename": "checkpoint.pth.tar", "workspace": "./", "memory_format": "nchw",
    "use_ema": None, "augmentation": None, "gpu_affinity": "none", "topk": 5,
}
# Where this suite's default deliberately differs: the reference's resnet50 is not a model of this suite.
DELIBERATE_DEFAULTS = {"arch": "efficientnet-b0"}
MODEL_DEFAULTS_B0 = {"num_classes": 1000, "conv_init": "fan_in", "bn_momentum": 0.01, "bn_epsilon": 1e-3,
                     "trt": False, "pretrained_from_file": None}


def test_reference_defaults_and_dests():
    defaults = vars(build_parser().parse_args([]))
    for dest, value in {**REFERENCE_DEFAULTS, **DELIBERATE_DEFAULTS}.items():
        assert defaults[dest] == value, dest
    args = parse_args(["/data", "-a", "efficientnet-b0"])
    for dest, value in MODEL_DEFAULTS_B0.items():
        assert getattr(args.model_args, dest) == value, dest
    assert args.device == "auto" and args.tf32 is True


def test_short_and_alias_spellings():
    args = parse_args(["-a", "efficientnet-b4", "-j", "3", "-b", "8", "-p", "7", "--wd", "5e-6", "--num-classes", "10",
                       "--no-checkpoints", "--jit", "compile", "--lr-schedule", "exponential", "/data"])
    assert (args.arch, args.workers, args.batch_size, args.print_freq, args.weight_decay) == \
        ("efficientnet-b4", 3, 8, 7, 5e-6)
    assert args.model_args.num_classes == 10 and args.save_checkpoints is False
    assert args.model_args.survival_prob == pytest.approx(0.8)  # b4's own default
    assert parse_args(["/d", "-a", "efficientnet-b0", "--num_classes", "3"]).model_args.num_classes == 3


def test_model_flags_may_precede_the_data_folder():
    args = parse_args(["--arch", "efficientnet-b0", "--num_classes", "10", "--trt", "True", "/data"])
    assert args.data == "/data" and args.model_args.num_classes == 10 and args.model_args.trt is True


def test_unknown_flag_lists_valid_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["/data", "-a", "efficientnet-b0", "--bogus-flag", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--bogus-flag" in err and "valid flags:" in err and "--raport-file" in err and "--bn_momentum" in err


def test_unknown_arch_lists_models(capsys):
    with pytest.raises(SystemExit):
        parse_args(["/data", "--arch", "resnet50"])
    assert "efficientnet-b0" in capsys.readouterr().err


def test_without_arch_runs_efficientnet_b0_and_help_says_why(capsys):
    # The reference's default --arch resnet50 is not in this suite: a reference command line without --arch
    # must still run (efficientnet-b0), and -h must say why the default differs.
    assert parse_args(["/data"]).arch == "efficientnet-b0"
    with pytest.raises(SystemExit):
        parse_args(["-h"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: efficientnet-b0; the reference's default, resnet50" in help_text


def test_reference_spellings_learning_rate_and_gpu_affinity_names():
    assert parse_args(["/d", "--learning-rate", "0.256"]).lr == 0.256
    assert parse_args(["/d", "--lr", "0.5"]).lr == 0.5
    for name in ("socket_single", "socket_single_unique", "socket", "socket_unique_interleaved",
                 "socket_unique_contiguous", "none"):
        assert parse_args(["/d", "--gpu-affinity", name]).gpu_affinity == name
    # This suite's earlier names stay as aliases of the reference's.
    assert parse_args(["/d", "--gpu-affinity", "single"]).gpu_affinity == "socket_single"
    assert parse_args(["/d", "--gpu-affinity", "single_unique"]).gpu_affinity == "socket_single_unique"


@pytest.mark.parametrize("argv,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "-0.1"], "--lr"), (["--learning-rate", "inf"], "--lr"),
    (["--image-size", "0"], "--image-size"), (["--eval-image-size", "-5"], "--eval-image-size"),
    (["--label-smoothing", "1.5"], "--label-smoothing"), (["--label-smoothing", "1"], "--label-smoothing"),
    (["-b", "0"], "--batch-size"), (["-b", "-1"], "--batch-size"), (["--epochs", "0"], "--epochs"),
    (["--num_classes", "0"], "--num_classes"), (["--mixup", "-1"], "--mixup"), (["--use-ema", "2"], "--use-ema"),
    (["--workers", "-1"], "--workers"), (["--prefetch", "0"], "--prefetch"), (["--warmup", "-1"], "--warmup"),
    (["--momentum", "1.5"], "--momentum"), (["--weight-decay=-1e-5"], "--weight-decay"),
    (["--rmsprop-eps", "0"], "--rmsprop-eps"), (["--rmsprop-alpha", "nan"], "--rmsprop-alpha"),
    (["--static-loss-scale", "0"], "--static-loss-scale"), (["--print-freq", "0"], "--print-freq"),
    (["--prof", "0"], "--prof"), (["--run-epochs", "0"], "--run-epochs"), (["--topk", "0"], "--topk"),
    (["--gather-checkpoints", "-2"], "--gather-checkpoints"), (["--optimizer-batch-size", "0"],
                                                               "--optimizer-batch-size"),
    (["--n-stages", "0"], "--n-stages"), (["--randaug-magnitude", "31"], "--randaug-magnitude"),
    (["--end-lr", "nan"], "--end-lr"), (["--lr-decay", "0"], "--lr-decay"), (["--cutmix", "-0.5"], "--cutmix"),
    (["--dropout", "1"], "--dropout"), (["--survival_prob", "0"], "--survival_prob"),
    (["--bn_momentum", "2"], "--bn_momentum"), (["--bn_epsilon", "0"], "--bn_epsilon"),
    (["--early-stopping-patience", "0"], "--early-stopping-patience"), (["--epochs", "x"], "--epochs"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["/data", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main.py: error: argument ") and flag in err, err
    assert "must be" in err


def test_off_values_and_config_defaults_are_checked_too(capsys):
    args = parse_args(["/data", "--prof", "-1", "--run-epochs", "-1", "--optimizer-batch-size", "-1", "--lr", "0"])
    assert (args.prof, args.run_epochs, args.optimizer_batch_size, args.lr) == (-1, -1, -1, 0.0)
    # A configs.yml value does not pass through the flag's type: it is checked after parsing.
    with pytest.raises(SystemExit):
        parse_args(["/data"], defaults={"label_smoothing": 1.5})
    assert "--label-smoothing: must be a finite number in [0, 1), got 1.5" in capsys.readouterr().err


def test_defaults_dict_is_applied_and_checked():
    args = parse_args(["/data"], defaults={"arch": "efficientnet-b0", "data_backend": "pytorch", "num_classes": 7,
                                           "static_loss_scale": 128, "training_only": True})
    assert args.arch == "efficientnet-b0" and args.data_backend == "pytorch" and args.static_loss_scale == 128
    assert args.training_only and args.model_args.num_classes == 7
    assert parse_args(["/data", "--num_classes", "3"], defaults={"arch": "efficientnet-b0", "num_classes": 7}
                      ).model_args.num_classes == 3  # the command line wins
    with pytest.raises(ValueError, match="not_a_flag"):
        parse_args(["/data"], defaults={"arch": "efficientnet-b0", "not_a_flag": 1})


@pytest.mark.slow
def test_help_documents_main_and_model_flags():
    result = prefork.run([sys.executable, "main.py", "-h"], cwd=ROOT, timeout=120)
    assert result.returncode == 0
    for flag in ("--data-backend", "--raport-file", "--jit", "--lr-decay", "--device", "--no-tf32", "--num_classes",
                 "--survival_prob", "--pretrained-from-file", "compile", "exponential"):
        assert flag in result.stdout, flag


@pytest.mark.slow
def test_cpu_run_ignores_gpu_affinity_with_a_warning(tmp_path):
    # A performance hint, as --amp on a CPU: the reference's DGX lines (configs.yml sets the affinity) still run.
    result = prefork.run([sys.executable, "main.py", "--arch", "efficientnet-b0", "--data-backend", "synthetic",
                          "--image-size", "32", "-b", "2", "--num_classes", "2", "--device", "cpu", "--epochs", "1",
                          "--prof", "1", "--gpu-affinity", "socket", "--workspace", str(tmp_path)],
                         cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "--gpu-affinity socket pins processes to the cores near their GPU; this run is on cpu, so it is " \
           "ignored" in result.stderr


def test_jit_modes():
    from image_classification.train.setup import compile_model
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 8, 8)
    assert compile_model(tiny, "no") is tiny
    scripted = compile_model(tiny, "script")
    torch.testing.assert_close(scripted(x), tiny(x))
    from image_classification.models import get_entry
    b0 = get_entry("efficientnet-b0")(num_classes=2).eval()
    image = torch.randn(1, 3, 32, 32)
    try:
        scripted_b0 = compile_model(b0, "script")
    except ValueError as err:  # the model family must say so clearly when it cannot be scripted
        assert "cannot be scripted" in str(err) and "--jit compile" in str(err)
    else:
        torch.testing.assert_close(scripted_b0(image), b0(image))


# --- every recipe and configs.yml section parses ------------------------------------------------------------

LAUNCH_FLAGS = ("--model", "--precision", "--mode", "--platform", "--cfg_file")


def _configs() -> dict | None:
    path = ROOT / "configs.yml"
    if not path.is_file():
        return None
    import yaml
    return yaml.safe_load(path.read_text())


def _launch_defaults(config: dict, model: str, precision: str, mode: str, platform: str) -> dict:
    """configs.yml merged the way launch.py does: precision, platform, model entry, mode."""
    merged: dict = {}
    for section in (config["precision"][precision], config["platform"][platform],
                    config["models"][model][platform][precision], config["mode"][mode]):
        merged.update(section or {})
    return merged


def _recipe_commands() -> list[tuple[str, list[str]]]:
    """(recipe file, argv after the script) of every python command in efficientnet/**/*.sh."""
    commands = []
    for path in sorted((ROOT / "efficientnet").glob("**/*.sh")):
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\$\{?(\d)(:-[^}]*)?\}?", "/placeholder", line.split("#")[0])
            line = re.sub(r"\$\{?\w+\}?", "8", line)  # loop variables such as batch sizes
            if ".py" not in line:
                continue
            tokens = shlex.split(line)
            scripts = [i for i, t in enumerate(tokens) if t.endswith(("main.py", "launch.py", "quant_main.py"))]
            if scripts:
                i = scripts[-1]
                commands.append((f"{path.relative_to(ROOT)}:{Path(tokens[i]).name}", tokens[i:]))
    return commands


@pytest.mark.slow
def test_every_recipe_and_config_parses():
    config = _configs()
    commands = _recipe_commands()
    if config is None and not commands:
        pytest.skip("no configs.yml and no efficientnet/**/*.sh recipes yet")
    checked = 0
    for name, (script, *argv) in commands:
        script = Path(script).name
        if script == "quant_main.py":
            import quant_main
            args = quant_main.parse_args(argv)
        elif script == "main.py":
            args = parse_args(argv)
        else:
            assert config is not None, f"{name} uses launch.py but there is no configs.yml"
            launch = argparse.ArgumentParser(add_help=False)
            for flag in LAUNCH_FLAGS:
                launch.add_argument(flag)
            known, rest = launch.parse_known_args(argv)
            defaults = _launch_defaults(config, known.model, known.precision, known.mode, known.platform)
            args = parse_args(rest, defaults=defaults)
            assert args.arch == known.model, name
        assert args.arch.startswith("efficientnet"), name
        checked += 1
    if config is not None:
        for model, platforms in config["models"].items():
            for platform, precisions in platforms.items():
                for precision in precisions:
                    for mode in config["mode"]:
                        args = parse_args(["/data"], defaults=_launch_defaults(config, model, precision, mode,
                                                                               platform))
                        assert args.arch == model
                        checked += 1
    assert checked
