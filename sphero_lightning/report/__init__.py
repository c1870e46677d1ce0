"""The alignment page: reslices before and after, curves along the stack, flagged pairs (numpy, zarr, Pillow; no
torch, no Lightning). Built at the end of ``sphero fit`` and by ``sphero report``."""
