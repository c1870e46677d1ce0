"""sphero_lightning: affine alignment of serial-section and block-face EM stacks stored in Zarr."""

__version__ = "0.1.0"

__all__ = ["__version__"]
