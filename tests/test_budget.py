"""Large slices: the memory budget and the finest level's pixel cap are honoured, said, and cost no accuracy."""

from __future__ import annotations

import numpy as np

from sphero_lightning import register_stack
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack


def test_a_small_budget_and_a_capped_finest_level_give_the_unconstrained_result(capsys):
    s = make_stack(em_like_image(640, seed=2), 5, (512, 512), seed=4)
    free = register_stack(s.stack)
    capsys.readouterr()
    tight = register_stack(s.stack, options={"pyramid.finest_max_pixels": 65536, "data.memory_budget_gb": 0.01})
    err = capsys.readouterr().err
    # what the run chose, in its own words
    assert "1 pair(s) per block" in err, err
    assert "finest pyramid level is at 1/2 resolution (256 x 256 px" in err, err
    assert "writing with 2 thread(s)" in err, err  # 0.01 GB holds two 512 x 512 slices at 20 bytes a pixel
    assert tight.settings["pairs_per_block"] == 1 and free.settings["pairs_per_block"] == 32
    d = composed_error(tight.pairwise, free.pairwise, (512, 512))
    assert d.mean() < 0.005 and d.max() < 0.01, d  # measured: 0.0048 mean, 0.0066 worst
    truth = composed_error(tight.composed, s.composed, (512, 512))
    assert truth.mean() < 0.01, truth
    assert np.array_equal(tight.crop_box, free.crop_box) or abs(np.subtract(tight.crop_box, free.crop_box)).max() <= 1
