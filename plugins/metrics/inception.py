"""Locating torch-fidelity's InceptionV3 weights before torch-fidelity is called.

torch-fidelity downloads its weights with ``torch.hub.load_state_dict_from_url`` when
``feature_extractor_weights_path`` is None. spheregen resolves the file itself
(:func:`spheregen.api.require_hub_file`: the torch hub cache, downloaded there by torch hub
when online) and always passes the path, so torch-fidelity never downloads; offline, a
missing file is a :class:`WeightsError` raised when the metric is built.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from spheregen.api import require_hub_file

EXTRACTOR = "inception-v3-compat"
# torch-fidelity's own file name (what its download would write), then pytorch-fid's name
# for the same converted TF-2015-12-05 graph (same sha256 prefix 6726825d, same keys).
WEIGHT_FILES = (os.path.basename(URL_INCEPTION_V3), "pt_inception-2015-12-05-6726825d.pth")


def find_inception_weights() -> Path:
    """The InceptionV3 weights file (fetched into the hub cache when online), or a
    WeightsError saying how to get it."""
    return require_hub_file(
        WEIGHT_FILES, URL_INCEPTION_V3, 'features = "inception"',
        'set features = "domain-classifier" in this metric\'s config: a classifier spheregen trains on the '
        "experiment's labelled data, reported as its own feature space (FID[domain-classifier]), not comparable "
        "with published Inception numbers",
    )
