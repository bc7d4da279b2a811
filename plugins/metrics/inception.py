"""Locating torch-fidelity's InceptionV3 weights without ever downloading them.

torch-fidelity downloads its weights with ``torch.hub.load_state_dict_from_url`` when
``feature_extractor_weights_path`` is None. spheregen looks the file up itself in the
torch hub cache (``torch.hub.get_dir()/checkpoints``: ``$TORCH_HOME/hub/checkpoints``,
default ``~/.cache/torch/hub/checkpoints``) and always passes the path, so a missing
file is a :class:`WeightsError` raised when the metric is built, never a download.
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
    """The local InceptionV3 weights file, or a WeightsError saying how to get it."""
    return require_hub_file(
        WEIGHT_FILES, URL_INCEPTION_V3, 'features = "inception"',
        'set features = "domain-classifier" in this metric\'s config: a classifier spheregen trains on the '
        "experiment's labelled data, reported as its own feature space (FID[domain-classifier]), not comparable "
        "with published Inception numbers",
    )
