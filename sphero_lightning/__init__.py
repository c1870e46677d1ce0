"""sphero_lightning: affine alignment of serial-section and block-face EM stacks stored in Zarr.

The Python API (:mod:`sphero_lightning.api`) is imported on first use, so that ``sphero --help`` and the commands
that need neither torch nor Lightning stay fast::

    from sphero_lightning import register_stack, warp_stack
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["Registration", "__version__", "register_stack", "warp_stack"]


def __getattr__(name: str) -> Any:
    if name in ("register_stack", "warp_stack", "Registration"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sphero_lightning' has no attribute {name!r}")
