"""Schedules: values per epoch including the original's one-epoch lag (docs/pipeline.md#schedules; Q34 in
docs/original-quirks.md)."""
import math

import pytest

from utils import ramps


def test_sigmoid_rampup_values():
    assert ramps.sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert ramps.sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert ramps.sigmoid_rampup(10, 10) == 1.0
    assert ramps.sigmoid_rampup(15, 10) == 1.0
    assert ramps.sigmoid_rampup(3, 0) == 1.0


@pytest.mark.parametrize("epoch, expected_arg", [(0, 0), (1, 0), (2, 1), (150, 149), (300, 299)])
def test_lagged_schedules(epoch, expected_arg):
    base, E, w = 3e-2, 300, 0.1
    assert ramps.lr_at_epoch(epoch, E, base) == pytest.approx(base * (1 - expected_arg / E) ** 0.9)
    assert ramps.unsup_weight_at_epoch(epoch, w, E) == pytest.approx(w * math.exp(-5 * (1 - expected_arg / E) ** 2))


def test_spec_examples():
    # E=300, epoch 150 ≈ 0.539·base, epoch 300 ≈ 0.0059·base; λ before epoch 0 = w·e^-5.
    assert ramps.lr_at_epoch(150, 300, 1.0) == pytest.approx(0.539, abs=1e-3)
    assert ramps.lr_at_epoch(300, 300, 1.0) == pytest.approx(0.0059, abs=1e-4)
    assert ramps.unsup_weight_at_epoch(0, 0.1, 300) == pytest.approx(0.1 * 0.0067379, rel=1e-4)
    assert ramps.unsup_weight_at_epoch(7, 0.1, None) == 0.1  # ramp-up off


def test_ema():
    assert ramps.ema(1.0, 0.0, 0.99) == pytest.approx(0.01)
    assert ramps.ema(2.0, 4.0, 0.5) == 3.0
