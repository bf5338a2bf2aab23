"""image_classification.api: train, evaluate and classify from Python, as the scripts do. CPU only, tiny sizes."""
from __future__ import annotations

import pytest

from image_classification import api, models
from image_classification.arguments import parse_config
from image_classification.config_file import ConfigFileError
from image_classification.deploy.classify import Prediction
import tiny_model


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())


def test_config_takes_settings_as_a_config_file_does(tmp_path):
    config = api.config("/imagenet", arch="efficientnet-b4", weight_decay=5e-6, **{"lr-schedule": "cosine"},
                        num_classes=10, argv=["--epochs", "3"])
    assert config == parse_config(["/imagenet", "--arch", "efficientnet-b4", "--wd", "5e-6", "--lr-schedule", "cosine",
                                   "--num_classes", "10", "--epochs", "3"])
    with pytest.raises(ConfigFileError, match="settings: 'learning_rat': not a main.py"):
        api.config("/imagenet", learning_rat=0.1)


def test_train_evaluate_and_classify(tiny, generated, tmp_path):
    config = api.config(generated, arch=tiny_model.NAME, data_backend="pytorch", batch_size=4, epochs=1, workers=0,
                        device="cpu", seed=1, workspace=str(tmp_path))
    summary = api.train(config)
    assert summary["epoch"] == 1 and not summary["interrupted"] and 0 <= summary["val.top1"] <= 100
    evaluated = api.evaluate(config.replace(workspace=str(tmp_path / "eval")))
    assert evaluated["val.top1"] >= 0 and "train.loss" not in evaluated
    images = sorted((generated / "val").glob("*/*.jpg"))[:2]
    predictions = api.classify(images, arch="efficientnet-b0", num_classes=3, image_size=32,
                               class_names=tmp_path / "classes.txt", cpu=True)
    assert [p.path for p in predictions] == list(map(str, images))
    assert all(isinstance(p, Prediction) and len(p.top) == 3 for p in predictions)
    assert {name for name, _ in predictions[0].top} == {"circle", "square", "triangle"}
