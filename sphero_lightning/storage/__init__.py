"""Zarr stores, OME-NGFF metadata, the progress journal (no torch, no Lightning)."""
