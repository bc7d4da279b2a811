"""class-accuracy: the domain classifier's verdict on conditional samples."""

from __future__ import annotations

import pytest
import torch

from metric_data import CLASSIFIER
from spheregen_plugins.metrics.class_accuracy import ClassAccuracy
from spheregen_plugins.metrics.config import ClassAccuracyConfig

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def metric(ctx):
    return ClassAccuracy(ClassAccuracyConfig(classifier=CLASSIFIER), ctx)


def test_real_digits_score_near_the_classifier_accuracy_and_wrong_labels_near_zero(metric, digits):
    _, _, x, y = digits
    right = metric.compute(x, None, labels=y)
    assert right["class_acc"] > 0.8 and right["class_acc_real"] > 0.8
    assert right["class_acc"] == pytest.approx(right["class_acc_real"])  # the same held-out split
    shifted = metric.compute(x, None, labels=(y + 1) % 10)
    assert shifted["class_acc"] < 0.2


def test_labels_are_required(metric):
    x = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one label per sample"):
        metric.compute(x, None)
