"""spheregen: head-to-head benchmarking of sphere-based image generators.

``spheregen.hookimpl`` marks a plugin's hook implementations; every other name of the
public toolkit (:mod:`spheregen.api`) is also readable here, e.g. ``spheregen.guided``;
``spheregen.load(run, method=...)`` returns a trained method (:mod:`spheregen.generate`).
"""

import importlib
import importlib.util
from typing import Any

from spheregen.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]


def __getattr__(name: str) -> Any:
    # The toolkit is imported on first use, so `import spheregen` (each plugin module's
    # first line, the CLI's start) costs pluggy alone.
    if name in ("load", "Generator"):  # trained methods from Python (spheregen.generate)
        return getattr(importlib.import_module("spheregen.generate"), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule not imported yet (`from spheregen import distributed` asks here
        # first): importing the toolkit for it would import spheregen.fit half-way
        return importlib.import_module(f"{__name__}.{name}")
    api = importlib.import_module("spheregen.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'spheregen' has no attribute {name!r}")
