"""Stage-wise progressive training schedule."""
import pytest

from image_classification.toolkit.progressive import ProgressiveSchedule


def test_four_stages_interpolate_linearly_from_base_to_final():
    schedule = ProgressiveSchedule(epochs=8, n_stages=4, image_size=300, base_image_size=128, mixup=0.3,
                                   base_mixup=0.0, cutmix=0.6, base_cutmix=0.0, randaug_magnitude=15,
                                   base_randaug_magnitude=5)
    got = [schedule.settings(e) for e in range(8)]
    assert [s.stage for s in got] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s.image_size for s in got[::2]] == [128, 185, 243, 300]
    assert [s.mixup for s in got[::2]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [s.cutmix for s in got[::2]] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert [s.randaug_magnitude for s in got[::2]] == [5, 8, 12, 15]


def test_one_stage_ignores_base_values():
    schedule = ProgressiveSchedule(epochs=3, n_stages=1, image_size=64, base_image_size=32, mixup=0.2,
                                   base_mixup=0.9)
    assert {(s.image_size, s.mixup) for s in map(schedule.settings, range(3))} == {(64, 0.2)}


def test_uneven_split_gives_every_stage_an_epoch():
    schedule = ProgressiveSchedule(epochs=5, n_stages=3, image_size=64, base_image_size=32)
    assert [schedule.stage_of(e) for e in range(5)] == [0, 0, 1, 1, 2]


def test_more_stages_than_epochs_is_refused():
    with pytest.raises(ValueError, match="--n-stages"):
        ProgressiveSchedule(epochs=2, n_stages=3, image_size=64, base_image_size=32)
