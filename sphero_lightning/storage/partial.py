"""The resumable temporary output of a write: the output under a temporary name, its same-pass levels and one
``written`` flag per task, keyed by the fingerprint of everything that determines the output's bytes. A run killed
while writing leaves them; the same command finds them, checks the fingerprint, and writes only the tasks not yet
flagged (:func:`~.writing.warp_stack`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from .store import create_array
from .writing import WRITER_VERSION, output_units


def resumed_line(command: str, resumed: int, units: int) -> str:
    """What a resumed write prints: how much of the output an interrupted ``command`` had written."""
    return (f"sphero: resuming an interrupted {command}: {resumed} of {units} parts of the output (rows of chunks or "
            f"whole slices) are already written")


def fingerprint(**settings: Any) -> str:
    """A digest of everything that determines an output's bytes."""
    text = json.dumps({"writer_version": WRITER_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_partial(group: zarr.Group, tmp_name: str, *, shape: tuple[int, int, int], chunks: tuple[int, int, int],
                 shards: tuple[int, int, int] | None, dtype: Any, compression_level: int, key: str,
                 n_units: int, levels: Sequence[tuple[str, tuple[int, int, int], tuple[int, int, int]]] = ()) -> int:
    """The temporary output, its same-pass ``levels`` (:func:`level_arrays`) and its ``written`` flags: those of an
    interrupted run with the same fingerprint ``key`` (resumed), else new ones (and no other temporary levels: those of
    an interrupted run with more levels). Returns how many units are already written."""
    flags = f"{tmp_name}-written"
    arrays = [(tmp_name, shape, chunks, shards), *((name, s, c, None) for name, s, c in levels)]
    try:
        written = group[flags]
        same = written.attrs.get("fingerprint") == key and written.shape == (n_units,) and all(
            tuple(a.shape) == s and tuple(a.chunks) == c and getattr(a, "shards", None) == sh
            and np.dtype(a.dtype) == np.dtype(dtype) for a, s, c, sh in ((group[n], s, c, sh) for n, s, c, sh in arrays))
    except KeyError:
        same = False
    if same:
        return int(np.count_nonzero(written[:]))
    for name in [n for n in group.array_keys() if n.startswith(f"{tmp_name}-level")]:
        del group[name]
    for name, s, c, sh in arrays:
        create_array(group, name, shape=s, chunks=c, shards=sh, dtype=dtype, compression_level=compression_level)
    written = group.create_array(flags, shape=(n_units,), chunks=(1,), dtype="uint8", fill_value=0, overwrite=True)
    written.attrs["fingerprint"] = key
    return 0


def prepare_output(group: zarr.Group, tmp_name: str, *, shape: tuple[int, int, int], chunks: tuple[int, int, int],
                   shards: tuple[int, int, int] | None, dtype: Any, compression_level: int, full_shape: tuple[int, int],
                   levels: list[tuple[str, tuple[int, int, int], tuple[int, int, int]]] | None = None,
                   nearest: bool = False, **settings: Any) -> tuple[int, int]:
    """The temporary output of a write, its same-pass ``levels`` (:func:`level_arrays`; ``nearest``: how they are
    reduced) and its flags (:func:`open_partial`), keyed by the layout and ``settings`` (source, transforms, crop,
    interpolation: everything else that determines the bytes). Returns ``(tasks, tasks already written)``: the second
    is non-zero where an interrupted write of the same output is resumed."""
    n_units = len(output_units(shape, shards or chunks, full_shape))
    if levels:
        settings = {**settings, "levels": [[s, c] for _, s, c in levels], "levels_nearest": nearest}
    key = fingerprint(shape=shape, chunks=chunks, shards=shards, dtype=str(np.dtype(dtype)),
                      compression_level=compression_level, **settings)
    return n_units, open_partial(group, tmp_name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                 compression_level=compression_level, key=key, n_units=n_units, levels=levels or ())
