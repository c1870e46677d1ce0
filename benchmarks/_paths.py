"""Where the benchmarks find the shared real data: ``../shared/data`` beside the checkout, or ``$SPHERO_SHARED_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("SPHERO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ISBI_PATH = SHARED_DATA / "isbi2012" / "train-volume.tif"
