"""Post-processing of frame scores before decoding: the DCASE baselines' median filter.

The DCASE 2021-2023 baselines binarise each threshold's frame scores and
median-filter the binary activity (``scipy.ndimage.median_filter`` over
``median_window`` frames, 7 frames of 64 ms). A median over an odd window
commutes with thresholding (``median(x) >= t`` exactly when most of the
window is ``>= t``), so filtering the scores once and then thresholding gives
the same activity at every threshold, for one filter instead of one per
threshold. This example's frames are 156.25 ms, and ``MEDIAN_FRAMES = 3``
(0.47 s) spans the baselines' 0.45 s.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import median_filter as _scipy_median

MEDIAN_FRAMES = 3


def median_filter(frame_scores: torch.Tensor, frames: int = MEDIAN_FRAMES) -> torch.Tensor:
    """The median of every ``frames`` consecutive frames of ``[B, T, C]`` scores, per clip and class.

    Borders are reflected (scipy's ``mode="reflect"``, the baselines' default);
    ``frames=1`` returns the scores unchanged.

    >>> scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2], dtype=torch.float64).reshape(1, 5, 1)
    >>> median_filter(scores).flatten().tolist()  # windows (0.9 0.9 0.1), (0.9 0.1 0.8), ..., (0.7 0.2 0.2)
    [0.9, 0.8, 0.7, 0.7, 0.2]
    """
    if frames < 1 or frames % 2 == 0:
        raise ValueError(f"the median filter needs an odd number of frames >= 1; found {frames}")
    if frame_scores.ndim != 3:
        raise ValueError(f"expected frame scores [clips, frames, classes]; found shape {tuple(frame_scores.shape)}")
    if frames == 1:
        return frame_scores
    filtered = _scipy_median(frame_scores.detach().cpu().numpy(), size=(1, frames, 1), mode="reflect")
    return torch.from_numpy(np.ascontiguousarray(filtered)).to(frame_scores.device)
