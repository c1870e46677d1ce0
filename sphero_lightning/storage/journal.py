"""Progress journal: finished pairs survive a crash, and running the same command again resumes.

The journal lives inside the store, next to where the output will go, as a small Zarr group
``<dst_group>/tmp-<z>-<y>-<x>-journal`` whose attributes hold the settings that determine the result
(the fingerprint, which includes the damaged-slice scan). After every block the pairs it finished are
added as one small JSON file (``pairs-<first>-<last>.json``, written to a temporary file and renamed), so
a SIGKILL at any moment leaves whole files only, and the cost of saving does not grow with the stack.
It is removed once the output is in place.

A journal written with other settings (or for other data) is never mixed in: the run starts over
and says so. ``--data.resume false`` ignores any journal.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ..core.records import PairRecord

#: Bump when the journal's content changes meaning.
VERSION = 2


def _canonical(value: Any) -> Any:
    """JSON round trip, so fingerprints compare equal however they were built (tuples, numpy floats)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class Journal:
    """Load and save the finished pairs of a run.

    Parameters
    ----------
    path : Path
        The journal group's directory.
    fingerprint : dict
        Everything that determines the pairs' results (source, slices, model and schedule settings).
    zarr_format : int
        The format of the store it lives in: a v3 group (``zarr.json``) or a v2 group (``.zgroup`` and ``.zattrs``).
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any], zarr_format: int = 3) -> None:
        self.path = Path(path)
        self.fingerprint = _canonical(fingerprint)
        self.zarr_format = zarr_format

    @property
    def file(self) -> Path:
        return self.path / ("zarr.json" if self.zarr_format == 3 else ".zattrs")

    def _attributes(self, doc: dict[str, Any]) -> dict[str, Any]:
        return doc["attributes"] if self.zarr_format == 3 else doc

    def _matches(self, say: bool = True) -> bool | None:
        """Whether the journal on disk was made with this fingerprint (None: there is none); ``say``: tell the user
        when one is there but cannot be used."""
        if not self.file.exists():
            return None
        try:
            doc = self._attributes(json.loads(self.file.read_text()))["sphero_journal"]
        except (OSError, ValueError, KeyError, TypeError):
            if say:
                print(f"sphero: the progress journal {self.path} is unreadable; starting over", file=sys.stderr)
            return False
        if doc.get("version") != VERSION or doc.get("fingerprint") != self.fingerprint:
            if say:
                print(f"sphero: the progress journal {self.path} was made with other settings or data; starting over",
                      file=sys.stderr)
            return False
        return True

    def load(self) -> dict[int, PairRecord]:
        """Finished pairs of an earlier run with the same settings (else empty)."""
        if not self._matches():
            return {}
        results: dict[int, PairRecord] = {}
        for part in sorted(self.path.glob("pairs-*.json")):
            try:
                results.update({int(k): v for k, v in json.loads(part.read_text()).items()})
            except (OSError, ValueError, AttributeError):
                continue  # cannot happen with atomic writes; those pairs are fitted again
        self._saved = set(results)
        self._started = True
        return results

    def _write(self, target: Path, doc: Any) -> None:
        tmp = self.path / f".{target.name}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def save(self, results: dict[int, PairRecord]) -> None:
        """Add the pairs of ``results`` not saved yet (one new file); start a fresh journal the first time."""
        if not getattr(self, "_started", False):
            if self.path.exists() and not self._matches(say=False):  # load() said so already
                self._clear()
            self.path.mkdir(parents=True, exist_ok=True)
            attrs = {"sphero_journal": {"version": VERSION, "fingerprint": self.fingerprint}}
            if self.zarr_format == 3:
                self._write(self.file, {"zarr_format": 3, "node_type": "group", "attributes": attrs})
            else:
                self._write(self.path / ".zgroup", {"zarr_format": 2})
                self._write(self.file, attrs)
            self._saved: set[int] = set(getattr(self, "_saved", set()))
            self._started = True
        new = {k: results[k] for k in sorted(results) if k not in self._saved}
        if not new:
            return
        self._write(self.path / f"pairs-{min(new):08d}-{max(new):08d}.json", {str(k): v for k, v in new.items()})
        self._saved.update(new)

    @staticmethod
    def count_saved(path: Path) -> int:
        """Pairs saved in the journal at ``path`` so far (for monitoring; 0 if there is none)."""
        n = 0
        for part in Path(path).glob("pairs-*.json"):
            try:
                n += len(json.loads(part.read_text()))
            except (OSError, ValueError):
                pass
        return n

    def _clear(self) -> None:
        """Remove an outdated journal's content (not the run's lock file beside it)."""
        for p in self.path.iterdir():
            if p.name == "lock":
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
