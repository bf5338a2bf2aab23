"""--config FILE.yaml and the <workspace>/config.yaml every run writes: keys, precedence, errors, and a run repeated
bit for bit from the file. CPU only, tiny sizes."""
from __future__ import annotations

import shlex

import pytest
import torch
import yaml

import prefork
from image_classification import models
from image_classification.arguments import command_line, parse_args, parse_config
from image_classification.config import CONFIG_FILE, Config
from image_classification.config_file import ConfigFileError
from image_classification.launcher import build_args
from runs import train
import tiny_model


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())


def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_keys_are_dests_or_long_names_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "c.yaml", "weight-decay: 1.0e-5\nlr_schedule: cosine\nlearning_rate: 0.5\nwarmup: 2\n"
                                        "no-checkpoints: true\ntf32: false\narch: efficientnet-b4\n"
                                        "num-classes: 10\nsurvival_prob: 0.9\ndata: /imagenet\nrmsprop_eps: 1e-4\n")
    args = parse_args(["--config", config, "--warmup", "5"])
    assert (args.weight_decay, args.lr_schedule, args.lr, args.warmup) == (1e-5, "cosine", 0.5, 5)
    assert (args.save_checkpoints, args.tf32, args.arch, args.data, args.rmsprop_eps) == \
        (False, False, "efficientnet-b4", "/imagenet", 1e-4)
    assert (args.model_args.num_classes, args.model_args.survival_prob) == (10, 0.9)  # the file's arch's flags
    assert not hasattr(args, "config")
    # Over configs.yml's defaults (launch.py), under the command line.
    launched = build_args(["--model", "efficientnet-b0", "--precision", "AMP", "--mode", "convergence", "--platform",
                           "DGXA100", "/imagenet", "--config", write(tmp_path / "l.yaml", "lr: 0.3\nepochs: 7\n"),
                           "--epochs", "9"])
    assert (launched.lr, launched.epochs, launched.amp) == (0.3, 9, True)


@pytest.mark.parametrize("text, message", [
    ("weight_decayy: 1\n", "'weight_decayy': not a main.py or efficientnet-b0 model flag"),
    ("lr: fast\n", "lr: --lr/--learning-rate must be a finite number >= 0, got 'fast'"),
    ("optimizer: adam\n", "optimizer: 'adam' is not a choice of --optimizer (sgd, rmsprop"),
    ("amp: 1\n", "amp: --amp is a switch: give true or false, not 1"),
    ("epochs: null\n", "epochs: --epochs needs a value"),
    ("lr: 0.1\nlearning-rate: 0.2\n", "lr and learning-rate both set lr"),
    ("- lr\n", "not a mapping of flag names to values"),
    ("config: other.yaml\n", "'config': not a main.py"),
])
def test_a_bad_file_is_one_error_naming_the_file_and_key(tmp_path, text, message):
    config = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigFileError) as err:
        parse_args(["--config", config, "--data-backend", "synthetic"])
    assert str(err.value).startswith(f"--config {config}: ") and message in str(err.value)


@pytest.mark.slow
def test_main_py_reports_a_bad_config_file_in_one_line(tmp_path):
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    result = prefork.run([sys.executable, "main.py", "--config", str(tmp_path / "missing.yaml")], cwd=root, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"main.py: error: --config {tmp_path / 'missing.yaml'}: cannot read (No such file or " \
                            "directory)\n"


def test_the_written_config_repeats_the_run_bit_for_bit(tiny, generated, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train([str(generated), "--arch", tiny_model.NAME, "--data-backend", "pytorch", "-b", "4", "--epochs", "2",
           "--lr", "0.05", "--optimizer", "rmsprop", "--wd", "1e-3", "--mixup", "0.2", "--label-smoothing", "0.1",
           "--seed", "7", "-j", "0", "--device", "cpu", "--print-freq", "3", "--workspace", str(first)])
    written = yaml.safe_load((first / CONFIG_FILE).read_text())
    assert (written["lr"], written["optimizer"], written["weight_decay"], written["num_classes"]) == \
        (0.05, "rmsprop", 1e-3, 3)
    train(["--config", str(first / CONFIG_FILE), "--workspace", str(second)])
    a = torch.load(first / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(second / "checkpoint.pth.tar", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["history"][-1]["train.loss"] == b["history"][-1]["train.loss"]
    # The second run's own file differs from the first's by the workspace only.
    again = yaml.safe_load((second / CONFIG_FILE).read_text())
    assert {k: v for k, v in again.items() if v != written[k]} == {"workspace": str(second)}


def test_settings_and_command_lines_round_trip(tmp_path):
    argv = ["/imagenet", "--arch", "efficientnet-b4", "--amp", "--no-checkpoints", "--lr", "0.16", "--wd", "5e-6",
            "--mlflow", "--tensorboard", str(tmp_path), "--num_classes", "10", "--trt", "True"]
    config = parse_config(argv)
    path = write(tmp_path / "c.yaml", yaml.safe_dump(config.settings()))
    assert parse_config(["--config", path]) == config
    assert Config.from_args(parse_args(command_line(parse_args(argv)))) == config
    assert shlex.join(command_line(parse_args(argv))).startswith("/imagenet --arch=efficientnet-b4 --lr=0.16 ")


def test_launch_py_prints_the_main_py_command_it_resolved(monkeypatch, capsys):
    from image_classification import api, launcher
    ran = []
    monkeypatch.setattr(api, "train", lambda config: ran.append(config) or {})
    launcher.main(["--model", "efficientnet-b0", "--precision", "AMP", "--mode", "convergence", "--platform",
                   "DGXA100", "/imagenet", "--workspace", "ws", "--epochs", "3"])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("launch.py: main.py /imagenet --data-backend=pytorch ")
    assert " --arch=efficientnet-b0 " in line and " --epochs=3 " in line and " --amp " in line
    assert line.endswith(" --workspace=ws")
    assert parse_config(shlex.split(line)[2:]) == ran[0]  # the printed line is the run
