"""What a first run on a small dataset used to do silently, reproduced at toy size: each trap now gives its line or
the right default (train/checks.py, train/exploding_loss.py), and the last validation's per-class accuracy and
confusion matrix (train/confusion.py)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from image_classification.arguments import parse_config
from image_classification.cli import UserError
from image_classification.config import Config
from image_classification.context import create_context
from image_classification.data import DataError
from image_classification.launcher import build_args
from image_classification.logger import Logger
from image_classification.models import get_entry
from image_classification.train.checks import with_class_count
from image_classification.train.confusion import ConfusionMatrix, draw_confusion, per_class_top1
from image_classification.train.exploding_loss import ExplodingLoss
from image_classification.train.setup import setup_job
from reports import read_report
from runs import train

CPU = create_context(device="cpu")
SIZE = 32


def _flags(data, workspace, *extra: str) -> list[str]:
    """A small run on the generated fixture: 3 classes, 24 training images, -b 4: 6 iterations per epoch."""
    return [str(data), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", str(SIZE), "-b", "4",
            "--workers", "0", "--epochs", "2", "--seed", "0", "--workspace", str(workspace), *extra]


def _setup(argv: list[str] | Config):
    """The job main.py would run, set up and closed again (nothing trained)."""
    config = argv if isinstance(argv, Config) else parse_config(argv)
    with create_context(device="cpu") as ctx:
        job = setup_job(config, ctx)
        job.__exit__()
    return job


# --- gradient accumulation -------------------------------------------------------------------------------------

def test_accumulation_that_completes_less_than_a_step_per_epoch_warns_with_the_numbers(generated, tmp_path, capsys):
    _setup(_flags(generated, tmp_path, "--optimizer-batch-size", "32"))
    assert ("warning: --optimizer-batch-size 32 with -b 4: 1 optimizer step every 8 iterations, 6 iterations per "
            "epoch: 0.75 steps per epoch, 1 step in this run; lower --optimizer-batch-size (-1: no accumulation) for "
            "a step every epoch") in capsys.readouterr().err.splitlines()
    _setup(_flags(generated, tmp_path, "--optimizer-batch-size", "32", "--epochs", "9", "--run-epochs", "1"))
    assert "0.75 steps per epoch, 0 steps in this run" in capsys.readouterr().err
    _setup(_flags(generated, tmp_path, "--optimizer-batch-size", "24"))  # a step every 6 iterations: every epoch
    assert "--optimizer-batch-size" not in capsys.readouterr().err


def test_accumulation_that_cannot_complete_one_step_in_the_run_is_an_error(generated, tmp_path, capsys):
    with pytest.raises(UserError) as err:
        _setup(_flags(generated, tmp_path, "--optimizer-batch-size", "64"))
    assert str(err.value) == ("--optimizer-batch-size 64 with -b 4: 1 optimizer step every 16 iterations, 6 iterations "
                              "per epoch: 0.38 steps per epoch, 0 steps in this run, none in its 2 epochs: lower "
                              "--optimizer-batch-size (-1: no accumulation) or raise -b")
    # With --prof (a benchmark) it is a warning.
    _setup(_flags(generated, tmp_path, "--optimizer-batch-size", "64", "--prof", "3"))
    assert "3 iterations per epoch: 0.19 steps per epoch, 0 steps in this run" in capsys.readouterr().err


def test_launch_py_on_a_small_dataset_says_what_configs_yml_accumulation_does(generated, tmp_path, capsys):
    # configs.yml's optimizer_batch_size 4096 with the CPU platform's -b 64: 64 iterations per step.
    args = build_args(["--model", "efficientnet-b0", "--precision", "FP32", "--mode", "convergence", "--platform",
                       "CPU", str(generated), "-b", "8", "--image-size", str(SIZE), "--workspace", str(tmp_path)])
    with pytest.raises(UserError, match=r"^--optimizer-batch-size 4096 with -b 8: 1 optimizer step every 512 "
                                        r"iterations, 3 iterations per epoch: 0.0059 steps per epoch, 0 steps in this "
                                        r"run, none in its 1 epoch: lower --optimizer-batch-size"):
        _setup(Config.from_args(args).replace(epochs=1))
    _setup(Config.from_args(args))  # 400 epochs: 2 steps in all
    assert "0.0059 steps per epoch, 2 steps in this run" in capsys.readouterr().err


# --- the class count -------------------------------------------------------------------------------------------

def test_num_classes_defaults_to_the_datas_class_count(generated, tmp_path, capsys):
    job = _setup(_flags(generated, tmp_path))
    assert job.config.model.num_classes == 3 and job.trainer.model.classifier.fc.out_features == 3
    assert f"=> 3 classes, as {generated} has" in capsys.readouterr().out
    # In the report, as a checkpoint's "args", the class count the model has.
    assert job.config.plain()["model_args"]["num_classes"] == 3


def test_num_classes_larger_than_the_data_is_an_error_naming_both_and_smaller_one_too(generated, tmp_path):
    with pytest.raises(UserError) as err:
        _setup(_flags(generated, tmp_path, "--num_classes", "1000"))
    assert str(err.value) == (f"--num_classes 1000: {generated} has 3 classes, so 997 of the model's outputs would "
                              "never be a label; give --num_classes 3 or leave it out (the default is the data's "
                              "class count)")
    with pytest.raises(DataError, match="has 3 classes but the model has --num_classes 2"):
        _setup(_flags(generated, tmp_path, "--num_classes", "2"))


def test_weights_keep_their_class_count_with_a_warning_and_reset_classifier_takes_the_datas(generated, tmp_path,
                                                                                              capsys):
    weights = tmp_path / "ten.pth"
    torch.save(get_entry("efficientnet-b0")(num_classes=10).state_dict(), weights)
    job = _setup(_flags(generated, tmp_path, "--pretrained-from-file", str(weights)))
    assert job.config.model.num_classes == 10
    assert (f"warning: the model keeps the 10 classes of the --pretrained-from-file weights while {generated} has 3 "
            "classes: its labels 0-2 stand for the weights' first 3; to train a 3-class head from them, add "
            "--reset-classifier") in capsys.readouterr().err
    job = _setup(_flags(generated, tmp_path, "--pretrained-from-file", str(weights), "--reset-classifier"))
    assert job.config.model.num_classes == 3


def test_launch_py_takes_the_datas_class_count_and_imagenet_keeps_1000(generated, tmp_path):
    """configs.yml sets num_classes: 1000 for every model, as the reference's: a default, which the data's class
    folders replace (ImageNet's give 1000), and which --num_classes on the command line overrides."""
    def resolved(data: Path, *extra: str) -> int:
        args = build_args(["--model", "efficientnet-b0", "--precision", "AMP", "--mode", "convergence", "--platform",
                           "DGXA100", str(data), *extra])
        assert args.model_args.num_classes == (int(extra[-1]) if extra else 1000)  # what configs.yml says
        config = with_class_count(Config.from_args(args), None, CPU, Logger(print_stdout=False))
        return config.model.num_classes

    imagenet = tmp_path / "imagenet"
    for i in range(1000):
        (imagenet / "train" / f"n{i:08d}").mkdir(parents=True)
    assert resolved(imagenet) == 1000
    assert resolved(generated) == 3
    assert resolved(generated, "--num_classes", "3") == 3
    with pytest.raises(UserError, match="--num_classes 5: "):
        resolved(generated, "--num_classes", "5")


def test_synthetic_data_keeps_the_default(tmp_path):
    config = parse_config(["--data-backend", "synthetic", "--workspace", str(tmp_path)])
    assert with_class_count(config, None, CPU, Logger(print_stdout=False)).model.num_classes == 1000


# --- evaluation that measures nothing --------------------------------------------------------------------------

def test_evaluate_without_weights_says_so_in_one_line(generated, tmp_path, capsys):
    _setup(_flags(generated, tmp_path, "--evaluate", "--topk", "2"))
    assert capsys.readouterr().err.splitlines() == [
        "warning: --evaluate without --resume, --pretrained or --pretrained-from-file: this scores efficientnet-b0's "
        "random initial weights"]
    weights = tmp_path / "three.pth"
    torch.save(get_entry("efficientnet-b0")(num_classes=3).state_dict(), weights)
    _setup(_flags(generated, tmp_path, "--evaluate", "--topk", "2", "--pretrained-from-file", str(weights)))
    assert capsys.readouterr().err == ""


# --- a loss that explodes -----------------------------------------------------------------------------------

def _explosion_check(record: dict, epoch: int = 0, accumulation: int = 1) -> None:
    job = SimpleNamespace(config=SimpleNamespace(model=SimpleNamespace(num_classes=10)), ctx=CPU,
                          trainer=SimpleNamespace(accumulation=accumulation))
    ExplodingLoss().epoch_record(job, epoch, record)


def test_exploding_loss_thresholds(capsys):
    chance = math.log(10)
    _explosion_check({"train.loss": 9 * chance, "val.loss": 999.0})
    _explosion_check({"train.loss": 9 * chance})                       # --training-only: no val.loss
    assert capsys.readouterr().err == ""
    _explosion_check({"train.loss": 11 * chance / 4, "val.loss": 2.0}, accumulation=4)  # train.loss is divided
    assert "train.loss 25.3" in capsys.readouterr().err
    _explosion_check({"train.loss": 2.0, "val.loss": float("inf")})
    assert "(val.loss inf; chance is ln(10) = 2.30)" in capsys.readouterr().err


def test_exploding_loss_warns_at_the_first_epoch_it_exploded_and_once(capsys):
    """With -b 256 on 1,000 images the first epochs look normal and validation explodes later."""
    feature = ExplodingLoss()
    job = SimpleNamespace(config=SimpleNamespace(model=SimpleNamespace(num_classes=10)), ctx=CPU,
                          trainer=SimpleNamespace(accumulation=1))
    feature.epoch_record(job, 0, {"train.loss": 2.4, "val.loss": 2.3})
    feature.epoch_record(job, 11, {"train.loss": 2.0, "val.loss": 1079.5})
    feature.epoch_record(job, 15, {"train.loss": 1.8, "val.loss": 23253.7})
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: the loss exploded in epoch 11 (val.loss 1.08e+03; chance is ln(10) = 2.30)")


def test_imagenet_defaults_on_small_data_warn_after_epoch_0_and_report_per_class_accuracy(generated, tmp_path,
                                                                                         capsys):
    """A learning rate far too high for the data (ImageNet's BN momentum 0.01 does the rest): the losses explode at
    chance accuracy, and one line names the flags and the README's section."""
    summary = train(_flags(generated, tmp_path, "--lr", "5", "--epochs", "1", "--topk", "2"))
    captured = capsys.readouterr()
    [line] = [line for line in captured.err.splitlines() if "exploded" in line]
    assert re.fullmatch(r"warning: the loss exploded in epoch 0 \(train\.loss \S+, val\.loss \S+; chance is ln\(3\) = "
                        r"1\.10\): ImageNet's defaults do this on small data; try a lower --lr, --bn_momentum 0\.1 and "
                        r"a -b that leaves 30 or more steps per epoch \(README\.md, \"Small data\"\)", line), line
    # The last validation's per-class accuracy and confusion matrix: a record, a PNG and a line.
    png = tmp_path / "confusion_matrix.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert f"confusion matrix: {png} (report: val.per_class_top1, val.confusion_matrix)" in captured.out
    [record] = [r for r in read_report(tmp_path / "experiment_raport.json") if r.get("step") == ["Per class", 0]]
    matrix, accuracy = record["data"]["val.confusion_matrix"], record["data"]["val.per_class_top1"]
    assert list(accuracy) == ["circle", "square", "triangle"] and [sum(row) for row in matrix] == [5, 5, 5]
    assert [100 * matrix[i][i] / 5 for i in range(3)] == list(accuracy.values())
    assert sum(matrix[i][i] for i in range(3)) / 15 * 100 == pytest.approx(summary["val.top1"])


# --- per-class accuracy and the confusion matrix ---------------------------------------------------------------

def test_confusion_matrix_and_per_class_accuracy_of_a_known_case(tmp_path):
    confusion = ConfusionMatrix(3, CPU)
    # True classes 0 0 0 1 1 2; predicted 0 1 0 1 1 0 (as the largest logit of each row).
    logits = torch.eye(3)[[0, 1, 0, 1, 1, 0]]
    confusion.add(logits[:4], torch.tensor([0, 0, 0, 1]))
    confusion.add(logits[4:], torch.tensor([1, 2]))
    counts = confusion.counts()
    assert counts.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert per_class_top1(counts) == [pytest.approx(200 / 3), 100.0, 0.0]
    assert per_class_top1(torch.tensor([[1, 0], [0, 0]])) == [100.0, None]  # a class without images
    draw_confusion(counts, ["a", "b", "c"], tmp_path / "c.png", title="known")
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    draw_confusion(torch.zeros(100, 100, dtype=torch.int64), [str(i) for i in range(100)], tmp_path / "big.png",
                   title="many classes")
    assert (tmp_path / "big.png").is_file()
