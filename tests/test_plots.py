"""Eval charts: per-class IoU, normalised confusion matrix and trimap curve as RGB images and PNGs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from deeplab_jax import evaluate, plots


def test_eval_charts_draw_and_write(tmp_path):
  confusion = np.array([[50, 5, 0], [10, 30, 0], [0, 0, 0]])
  result = {'step': 7, 'split': 'validation', 'miou': 0.6,
            'per_class_iou': {'background': 0.77, 'bright': 0.67, 'dark': None},
            'trimap': [{'width': 1, 'miou': 0.4}, {'width': 4, 'miou': 0.55}]}
  charts = plots.eval_charts(result, confusion, ['background', 'bright', 'dark'])
  assert sorted(charts) == ['confusion', 'per_class_iou', 'trimap']
  for chart in charts.values():
    assert chart.ndim == 3 and chart.shape[2] == 3 and chart.dtype == np.uint8
    assert chart.shape[0] > 100 and chart.shape[1] > 100 and chart.std() > 0
  written = evaluate.write_charts(tmp_path, 'validation', 7, charts)
  assert sorted(p.rsplit('/', 1)[1] for p in written) == [
      'validation_7_confusion.png', 'validation_7_per_class_iou.png', 'validation_7_trimap.png']
  with Image.open(written[0]) as png:
    assert png.mode == 'RGB' and png.size[::-1] == charts['per_class_iou'].shape[:2]
  without = plots.eval_charts({**result, 'trimap': []}, confusion, ['a', 'b', 'c'])
  assert sorted(without) == ['confusion', 'per_class_iou']
