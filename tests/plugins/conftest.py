"""Fixtures shared by the metric tests: sklearn digits at 16 px and a MetricContext
whose cache (trained domain classifier, reference features) lives for one module."""

import pytest

from metric_data import digits_16px, make_ctx


@pytest.fixture(scope="module")
def digits():
    return digits_16px()


@pytest.fixture(scope="module")
def ctx(digits, tmp_path_factory):
    return make_ctx(digits, tmp_path_factory.mktemp("metrics-cache"))
