"""``class-accuracy``: how often the domain classifier reads a sample as the class it
was generated for.

Needs the samples' labels, so it declares ``needs_labels = True`` and evaluation passes
them to ``compute(samples, reference, labels=...)``; the reference is not used. Only the
domain classifier can judge this (an ImageNet Inception knows no dataset's classes), so
there is no feature-space option. Its test accuracy on real held-out images, reported
next to the score as ``class_acc_real``, is the ceiling to read the score against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spheregen.api import Column, MetricContext
from spheregen_plugins.metrics import domain_classifier
from spheregen_plugins.metrics.config import ClassAccuracyConfig
from spheregen_plugins.metrics.fidelity import check_images


class ClassAccuracy:
    """Share of conditional samples the domain classifier reads as the asked class.

    uint8 N×C×H×W samples and int64 N labels -> {"class_acc": share in [0, 1],
    "class_acc_real": the classifier's accuracy on the real test split}."""

    needs_labels = True
    keys = ("class_acc", "class_acc_real")
    features = "domain-classifier"
    columns = (Column(key="class_acc", label="class acc.", format="{:.3f}", better="higher"),)

    def __init__(self, cfg: ClassAccuracyConfig, ctx: MetricContext):
        self.cfg = cfg
        self.ctx = ctx
        trained = domain_classifier.ensure_classifier(cfg.classifier, ctx)
        self.feature_info = trained.info
        self.real_accuracy = float(trained.test_accuracy)
        self.model, _ = domain_classifier.load_classifier(trained.path, ctx.device)

    @torch.no_grad()
    def compute(self, samples: Tensor, reference: Tensor | None = None, labels: Tensor | None = None
                ) -> dict[str, float]:
        samples = check_images("samples", samples)
        if labels is None or len(labels) != len(samples):
            got = "none" if labels is None else len(labels)
            raise ValueError(f"class-accuracy needs one label per sample ({len(samples)}), got {got}")
        accuracy = domain_classifier.classifier_accuracy(self.model, samples, labels.cpu(), self.cfg.batch_size)
        return {"class_acc": accuracy, "class_acc_real": self.real_accuracy}
