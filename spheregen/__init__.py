"""spheregen: head-to-head benchmarking of sphere-based image generators."""

from spheregen.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
