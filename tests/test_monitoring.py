"""What a run shows: TensorBoard scalars and image panels, QC flags for outlying pairs."""

from __future__ import annotations

import numpy as np
import zarr
from conftest import fit

from sphero_lightning.output import flag_outliers
from sphero_lightning.synthetic import em_like_image, make_stack, write_zarr


def test_tensorboard_has_loss_scalars_and_image_panels(tmp_path, base_image):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = make_stack(base_image, 6, (128, 128), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    logs = tmp_path / "logs"
    fit(root, "--trainer.log_every_n_steps", "1", logs=logs)
    events = list(logs.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/step", "loss/block_final", "pair/final_loss"} <= set(tags["scalars"]), tags["scalars"]
    assert len(acc.Scalars("pair/final_loss")) == 5
    assert any(t.endswith("_after") for t in tags["images"]) and any(t.endswith("_before") for t in tags["images"])


def test_outlying_pair_is_flagged(tmp_path, base_image):
    s = make_stack(base_image, 10, (128, 128), seed=2)
    st = s.stack.copy()
    other = em_like_image(512, seed=11)[100:228, 100:228]  # unrelated content: registers, but poorly
    st[6] = other
    root = tmp_path / "s.zarr"
    write_zarr(st, root)
    fit(root)
    log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
    flagged = sorted(e["pair_index"] for e in log if e.get("qc") == "outlier")
    assert flagged == [5, 6], [(e["pair_index"], e.get("qc_z")) for e in log]


def test_flag_outliers_robust_z():
    log = [{"final_loss": v, "pair_index": i} for i, v in enumerate([0.1, 0.11, 0.09, 0.1, 0.5, 0.1])]
    out = flag_outliers(log)
    assert [e["pair_index"] for e in out] == [4]
    assert all("qc_z" in e for e in log) and np.isclose(log[0]["qc_z"], 0.0)
