"""Trimap (boundary) mIoU: band masks against scipy's chessboard distance transform, a hand-counted
case, and the band confusion matrices against explicit loops."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deeplab_jax import metrics, trimap


def _reference_bands(label: np.ndarray, size: tuple[int, int], widths) -> np.ndarray:
  """Independent reference: boundary pixels by explicit neighbour loops inside the image, then
  scipy's chessboard distance to the nearest one."""
  h, w = size
  image = label[:h, :w]
  boundary = np.zeros((h, w), bool)
  for y in range(h):
    for x in range(w):
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          yy, xx = y + dy, x + dx
          if 0 <= yy < h and 0 <= xx < w and image[yy, xx] != image[y, x]:
            boundary[y, x] = True
  out = np.zeros((len(widths), *label.shape), bool)
  if boundary.any():
    distance = ndimage.distance_transform_cdt(~boundary, metric='chessboard')
    for i, width in enumerate(widths):
      out[i, :h, :w] = distance <= width
  return out


def test_bands_on_a_hand_made_label_map():
  # Left half class 1, right half class 2 (boundary: columns 2 and 3), in a 6x6 image padded to
  # 6x8 with 255; the padding edge (columns 5 | 6) is not a boundary.
  label = np.full((1, 6, 8), 255, np.int32)
  label[0, :, :3] = 1
  label[0, :, 3:6] = 2
  bands = np.asarray(trimap.band_masks(label, np.int32([[6, 6]]), (0, 1, 2, 9)))
  columns = [np.flatnonzero(bands[i, 0].any(0)).tolist() for i in range(4)]
  assert columns == [[2, 3], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
  assert bands[:, 0].all(1).any(1).tolist() == [True] * 4  # Whole columns: every row is in.
  # Counting: band of width 1 holds 4 columns x 6 rows; predictions wrong in column 4 only.
  prediction = np.where(np.arange(8) < 4, 1, 2)[None, None].repeat(6, 1)
  prediction = np.broadcast_to(prediction, label.shape)
  cm = np.asarray(trimap.trimap_confusion(label, prediction, np.int32([[6, 6]]),
                                          np.array([True]), (1,), 3))[0]
  np.testing.assert_array_equal(cm, [[0, 0, 0], [0, 12, 0], [0, 6, 6]])
  result = metrics.segmentation_metrics(cm)
  assert result['miou'] == pytest.approx((12 / 18 + 6 / 12) / 2)


def test_bands_match_the_chessboard_distance_transform():
  rng = np.random.default_rng(3)
  label = np.zeros((3, 30, 34), np.int32)
  sizes = np.int32([[30, 34], [24, 29], [17, 20]])
  for b, (h, w) in enumerate(sizes):
    label[b, 5:14, 6:19] = 1
    label[b, 10:22, 15:25] = 2
    label[b, 4:6, 2:30] = 255  # An ignore line: its edges are boundaries, as VOC's void bands.
    label[b, rng.random((30, 34)) < 0.01] = 3
    label[b, h:] = 255
    label[b, :, w:] = 255
  widths = (5, 0, 1, 3, 12)  # Any order.
  got = np.asarray(trimap.band_masks(label, sizes, widths))
  for b in range(3):
    expected = _reference_bands(label[b], tuple(sizes[b]), widths)
    np.testing.assert_array_equal(got[:, b], expected, err_msg=f'row {b}')
  # The band confusion: explicit loops over pixels in the band, inside, valid, not 255.
  prediction = rng.integers(0, 4, label.shape)
  valid = np.array([True, True, False])
  counts = np.asarray(trimap.trimap_confusion(label, prediction, sizes, valid, widths, 4))
  assert counts.shape == (len(widths), 4, 4) and counts.dtype == np.int32
  for i in range(len(widths)):
    expected = np.zeros((4, 4), np.int64)
    for b in range(3):
      band = _reference_bands(label[b], tuple(sizes[b]), widths)[i]
      for y, x in zip(*np.nonzero(band), strict=True):
        if valid[b] and label[b, y, x] != 255:
          expected[label[b, y, x], prediction[b, y, x]] += 1
    np.testing.assert_array_equal(counts[i], expected, err_msg=f'width {widths[i]}')
  assert counts[4].sum() > counts[3].sum() > counts[2].sum() > counts[1].sum() > 0


def test_no_boundary_no_band():
  label = np.ones((1, 5, 5), np.int32)
  bands = np.asarray(trimap.band_masks(label, np.int32([[5, 5]]), (0, 40)))
  assert not bands.any()
