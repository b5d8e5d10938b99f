"""mIoU from a confusion matrix (official `mean_iou` semantics), the metrics writer, multi-scale."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeplab_jax import inference, metrics, visualize
from deeplab_jax.models import layers


def test_confusion_matrix_counts_and_masks():
  labels = np.array([[0, 1, 2, 255], [1, 1, 0, 2]])
  preds = np.array([[0, 2, 2, 1], [1, 0, 0, 2]])
  mask = np.array([[True, True, True, True], [True, True, True, False]])
  cm = np.asarray(metrics.confusion_matrix(labels, preds, 4, mask))
  expected = np.zeros((4, 4), np.int64)
  for lab, pred in ((0, 0), (1, 2), (2, 2), (1, 1), (1, 0), (0, 0)):  # 255 and masked left out
    expected[lab, pred] += 1
  np.testing.assert_array_equal(cm, expected)
  assert cm.dtype == np.int32


def test_miou_hand_computed_with_ignore_and_absent_classes():
  # Rows: ground truth; columns: prediction. Classes 0..4:
  #   0, 1: present in both; 2: predicted but never in the ground truth (IoU 0, counts);
  #   3: absent from both (no IoU, not counted); 4: in the ground truth, never predicted (IoU 0).
  cm = np.array([
      [50, 5, 3, 0, 0],
      [10, 30, 0, 0, 0],
      [0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0],
      [2, 0, 0, 0, 0],
  ])
  result = metrics.segmentation_metrics(cm)
  iou0 = 50 / (58 + 62 - 50)
  iou1 = 30 / (40 + 35 - 30)
  expected_iou = [iou0, iou1, 0.0, math.nan, 0.0]
  np.testing.assert_allclose(result['per_class_iou'], expected_iou, rtol=1e-12)
  assert result['miou'] == pytest.approx((iou0 + iou1 + 0 + 0) / 4)
  assert result['pixel_accuracy'] == pytest.approx(80 / 100)
  record = metrics.results_dict(7, result, ['bg', 'a', 'b', 'c', 'd'])
  assert record['per_class_iou'] == {'bg': pytest.approx(iou0), 'a': pytest.approx(iou1),
                                     'b': 0.0, 'c': None, 'd': 0.0}
  assert json.loads(json.dumps(record)) == record  # JSON-safe (no NaN).
  # End to end from label maps: ignored pixels (255) change nothing.
  labels = np.array([0, 0, 1, 1, 255, 255])
  preds = np.array([0, 1, 1, 1, 0, 1])
  cm = np.asarray(metrics.confusion_matrix(labels, preds, 2))
  np.testing.assert_array_equal(cm, [[1, 1], [0, 2]])
  assert metrics.segmentation_metrics(cm)['miou'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  empty = metrics.segmentation_metrics(np.zeros((3, 3)))
  assert empty['miou'] == 0.0 and np.isnan(empty['per_class_iou']).all()


def test_jsonl_writer_appends_scalars(tmp_path):
  writer = metrics.JsonlWriter(tmp_path / metrics.METRICS_FILE)
  writer.write_scalars(1, {'train/loss': np.float32(2.5)})
  writer.write_images(1, {'x': np.zeros((1, 2, 2, 3), np.uint8)})  # Ignored.
  writer.write_scalars(2, {'train/loss': 1.5, 'eval/miou': jnp.asarray(0.25)})
  writer.close()
  assert metrics.read_metrics(tmp_path) == [{'step': 1, 'train/loss': 2.5},
                                            {'step': 2, 'train/loss': 1.5, 'eval/miou': 0.25}]


def test_palette_and_colorize():
  palette = visualize.voc_palette()
  np.testing.assert_array_equal(palette[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
  np.testing.assert_array_equal(palette[15], [192, 128, 128])  # VOC 'person'
  np.testing.assert_array_equal(palette[255], visualize.IGNORE_COLOUR)
  image = visualize.colorize(np.array([[0, 1], [255, 2]]))
  assert image.shape == (2, 2, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, 1], palette[1])


class _Probe:
  """A stand-in model: logits = a fixed per-pixel linear map of the image, records input sizes."""

  def __init__(self):
    self.sizes = []

  def apply(self, variables, images, train=False):
    del train
    self.sizes.append(images.shape[1:3])
    w = variables['params']['w']
    ramp = jnp.linspace(-1.0, 1.0, images.shape[2])[None, None, :, None]
    return jnp.einsum('nhwc,ck->nhwk', images, w) + ramp * jnp.arange(w.shape[1])


def test_multi_scale_flip_inference_matches_the_official_recipe():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 1, (2, 9, 13, 3)), jnp.float32)
  variables = {'params': {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}}
  probe = _Probe()
  probs, logits = inference.predict(probe, variables, images, scales=(0.5, 1.0, 1.5), flip=True)
  # Per scale: int((size - 1) * scale + 1); each scale once plain and once flipped.
  assert probe.sizes == [(5, 7), (5, 7), (9, 13), (9, 13), (13, 19), (13, 19)]
  expected_probs, expected_logits = 0.0, 0.0
  for scale in (0.5, 1.0, 1.5):
    size = inference.scaled_size((9, 13), scale)
    x = layers.resize_bilinear(images, size) if scale != 1.0 else images
    for flipped in (False, True):
      xi = x[:, :, ::-1] if flipped else x
      out = probe.apply(variables, xi)
      out = out[:, :, ::-1] if flipped else out
      out = layers.resize_bilinear(out, (9, 13))
      expected_probs = expected_probs + jax.nn.softmax(out) / 6
      expected_logits = expected_logits + out / 6
  np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
  # Single scale without flip: exactly the model's logits.
  _, single = inference.predict(probe, variables, images)
  np.testing.assert_allclose(single, probe.apply(variables, images), rtol=1e-6)
