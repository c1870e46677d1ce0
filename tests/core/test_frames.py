"""core/frames.py: the frame type (``Affine`` in the normalized, centred and pixel frames) converts and tests the identity
alike for numpy arrays and torch tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_the_frame_type_converts_and_tests_the_identity_for_numpy_and_torch():
    from sphero_lightning.core.frames import Affine, Frame

    theta = np.array([[[0.9, 0.1, 0.05], [-0.2, 1.1, -0.1]]])
    shape = (30, 50)
    for m in (theta, torch.from_numpy(theta)):
        a = Affine(m, Frame.NORMALIZED, shape)
        for frame in Frame:
            assert a.to(frame).matrix.shape[-2:] == (frame.rows, 3)
            back = a.to(frame).to(Frame.NORMALIZED).matrix
            assert type(back) is type(m) and np.allclose(np.asarray(back), theta), frame
            centred = a.to(frame).to(Frame.CENTRED).matrix
            assert np.allclose(np.asarray(centred), np.asarray(a.to(Frame.CENTRED).matrix)), frame
        assert not a.is_identity() and a.is_identity(tol=0.2)
        eye = m * 0 + (torch.eye(3, dtype=m.dtype)[:2] if isinstance(m, torch.Tensor) else np.eye(3)[:2])
        assert Affine(eye, Frame.CENTRED, shape).is_identity() and Affine(eye, Frame.NORMALIZED, shape).to(Frame.PIXEL).is_identity()
    for frame in Frame:  # numpy and torch agree
        assert np.allclose(Affine(torch.from_numpy(theta), Frame.NORMALIZED, shape).to(frame).matrix.numpy(),
                           Affine(theta, Frame.NORMALIZED, shape).to(frame).matrix)
    with pytest.raises(ValueError, match="pixel matrix is"):
        Affine(theta, Frame.PIXEL, shape)
