"""Built-in metrics: FID, KID, Inception Score, precision/recall (torch-fidelity), in the
Inception feature space or an offline domain-classifier feature space, and CMMD (MMD in
CLIP space or the same domain-classifier space; :mod:`spheregen_plugins.metrics.cmmd`),
and class accuracy of conditional samples under the domain classifier.

Each factory is ``Metric(cfg, ctx) -> Metric`` with ``keys``, ``features``,
``feature_info`` and ``compute(samples, reference)``; see
:mod:`spheregen_plugins.metrics.fidelity`. FLOPs, parameters and throughput are not
metrics of images; they live in :mod:`spheregen.flops`.
"""

import spheregen
from spheregen_plugins.metrics.class_accuracy import ClassAccuracy
from spheregen_plugins.metrics.cmmd import CMMD
from spheregen_plugins.metrics.config import (
    ClassAccuracyConfig,
    CmmdConfig,
    FidConfig,
    InceptionScoreConfig,
    KidConfig,
    PrecisionRecallConfig,
)
from spheregen_plugins.metrics.fidelity import FID, KID, InceptionScore, PrecisionRecall


@spheregen.hookimpl
def spheregen_register_metrics(register):
    register("fid", FID, FidConfig)
    register("kid", KID, KidConfig)
    register("inception-score", InceptionScore, InceptionScoreConfig)
    register("precision-recall", PrecisionRecall, PrecisionRecallConfig)
    register("cmmd", CMMD, CmmdConfig)
    register("class-accuracy", ClassAccuracy, ClassAccuracyConfig)
