"""Progress journal: finished pairs survive a crash, and running the same command again resumes.

The journal lives inside the store, next to where the output will go, as a small Zarr group
``<dst_group>/tmp-<z>-<y>-<x>-journal`` whose attributes hold the settings that determine the result
(the fingerprint, which includes the damaged-slice scan) and every finished pair. It is rewritten atomically
(temporary file, then rename) after every block, so a SIGKILL at any moment leaves either the old
or the new journal, never a torn one. It is removed once the output is in place.

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

#: Bump when the journal's content changes meaning.
VERSION = 1


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
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = _canonical(fingerprint)

    @property
    def file(self) -> Path:
        return self.path / "zarr.json"

    def load(self) -> dict[int, dict[str, Any]]:
        """Finished pairs of an earlier run with the same settings (else empty)."""
        if not self.file.exists():
            return {}
        try:
            doc = json.loads(self.file.read_text())["attributes"]["sphero_journal"]
        except (OSError, ValueError, KeyError, TypeError):
            print(f"sphero: the progress journal {self.path} is unreadable; starting over", file=sys.stderr)
            return {}
        if doc.get("version") != VERSION or doc.get("fingerprint") != self.fingerprint:
            print(f"sphero: the progress journal {self.path} was made with other settings or data; starting over",
                  file=sys.stderr)
            return {}
        return {int(k): v for k, v in doc.get("results", {}).items()}

    def save(self, results: dict[int, dict[str, Any]]) -> None:
        """Atomically replace the journal with ``results``."""
        self.path.mkdir(parents=True, exist_ok=True)
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {"sphero_journal": {
            "version": VERSION, "fingerprint": self.fingerprint,
            "results": {str(k): v for k, v in sorted(results.items())},
        }}}
        tmp = self.path / f".zarr.json.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
