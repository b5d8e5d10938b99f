"""Sliding-window evaluation: window geometry, slide == whole for an image that fits one window,
overlap averages against a numpy reference, the evaluator and the predictor in slide mode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakes import FAKE_CLASSES, fake_eval_iterator, fake_example, random_variables, tiny_config
from PIL import Image

from deeplab_jax import checkpoint, evaluate, inference, models, sharding, sliding


def test_window_geometry():
  assert sliding.window_stride((769, 769)) == (513, 513)  # mmsegmentation's Cityscapes stride.
  assert sliding.window_stride((513, 33)) == (342, 22)
  assert sliding.window_stride((33, 33), (10, 12)) == (10, 12)
  assert sliding.padded_size((20, 30), (33, 33), (22, 22)) == (33, 33)
  assert sliding.padded_size((34, 56), (33, 33), (22, 22)) == (55, 77)
  assert sliding.padded_size((1024, 2048), (769, 769), (513, 513)) == (1282, 2308)
  assert sliding.window_starts(55, 33, 22) == [0, 22]
  assert sliding.window_starts(60, 33, 22) == [0, 22, 27]  # The last window ends at the edge.
  assert sliding.window_starts(20, 33, 22) == [0]


class _Probe:
  """A stand-in model: logits = a per-pixel linear map of the image plus a ramp across the model's
  input (so a pixel's logits depend on where it sits in its window)."""

  def __init__(self):
    self.shapes = []

  def apply(self, variables, images, train=False):
    del train
    self.shapes.append(images.shape)
    w = variables['params']['w']
    ramp = jnp.linspace(-1.0, 1.0, images.shape[2])[None, None, :, None]
    return jnp.einsum('nhwc,ck->nhwk', images, w) + ramp * jnp.arange(w.shape[1])


VARIABLES = {'params': {'w': jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)),
                                         jnp.float32)}}


def test_slide_equals_whole_when_the_image_fits_one_window():
  images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 9, 13, 3)), jnp.float32)
  for scales, flip in (((1.0,), False), ((0.5, 1.0, 1.5), True)):
    whole = inference.predict(_Probe(), VARIABLES, images, scales, flip)
    for window in ((9, 13), (12, 20)):  # The padded image is the window, or smaller than it.
      slide = inference.predict_slide(_Probe(), VARIABLES, images, window, (5, 7), scales, flip,
                                      sizes=jnp.int32([[9, 13], [7, 10]]))
      for a, b in zip(whole, slide, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _whole(crop, scale, flip):
  return inference.predict(_Probe(), VARIABLES, crop, (scale,), flip)


def _reference_slide(images, window, stride, sizes, scales, flip):
  """Numpy: every window of the row's own padded size through `predict` alone (per scale and flip),
  window logits averaged per pixel, then softmax and the mean over scales and flips."""
  images = np.asarray(images)
  batch, height, width = images.shape[:3]
  wh, ww = window
  probs = np.zeros((batch, height, width, 4))
  logits_mean = np.zeros_like(probs)
  views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
  for b in range(batch):
    ph, pw = sliding.padded_size(sizes[b], window, stride)
    ys, xs = range(0, ph - wh + 1, stride[0]), range(0, pw - ww + 1, stride[1])
    for scale, flipped in views:
      total = np.zeros((height, width, 4))
      count = np.zeros((height, width, 1))
      for y in ys:
        for x in xs:
          crop = jnp.asarray(images[b:b + 1, y:y + wh, x:x + ww])
          _, out = _whole(crop, scale, False)
          if flipped:  # predict of the flipped crop, flipped back: the flip view alone.
            _, both = _whole(crop, scale, True)
            out = 2 * both - out
          total[y:y + wh, x:x + ww] += np.asarray(out[0], np.float64)
          count[y:y + wh, x:x + ww] += 1
      logits = np.where(count > 0, total / np.maximum(count, 1), 0.0)
      e = np.exp(logits - logits.max(-1, keepdims=True))
      probs[b] += e / e.sum(-1, keepdims=True) / len(views)
      logits_mean[b] += logits / len(views)
  return probs, logits_mean


@pytest.mark.parametrize('scales, flip', [((1.0,), False), ((0.75, 1.0), True)])
def test_slide_is_the_overlap_average_of_the_windows(scales, flip):
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(0, 1, (2, 17, 23, 3)), jnp.float32)
  window, stride = (9, 11), (4, 6)  # 17 = 9 + 2 * 4, 23 = 11 + 2 * 6: tiled exactly.
  sizes = np.int32([[17, 23], [12, 15]])  # Row 1: padded size 13 x 17, windows at 0, 4 / 0, 6.
  probe = _Probe()
  probs, logits = inference.predict_slide(probe, VARIABLES, images, window, stride, scales, flip,
                                          sizes=jnp.asarray(sizes))
  # All 9 windows of both rows in one model call per view.
  assert probe.shapes[0] == (18, *inference.scaled_size(window, scales[0]), 3)
  expected_probs, expected_logits = _reference_slide(images, window, stride, sizes, scales, flip)
  np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
  # Row 1 does not depend on its batch-mate: alone, padded to its own size, it gives the same.
  alone_probs, alone_logits = inference.predict_slide(
      _Probe(), VARIABLES, images[1:, :13, :17], window, stride, scales, flip)
  np.testing.assert_allclose(probs[1, :13, :17], alone_probs[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(logits[1, :13, :17], alone_logits[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(logits[1, 13:], 0.0)  # Beyond its own windows: nothing.


def _eval(config, iterator):
  evaluator = evaluate.Evaluator(config, sharding.create_mesh(), FAKE_CLASSES, iterator)
  return evaluator(random_variables(config), step=1), evaluator


def test_slide_evaluation_of_images_that_fit_equals_whole():
  config = tiny_config()
  config.eval.trimap_widths = (1, 4)
  whole, _ = _eval(config, fake_eval_iterator)
  config.eval.mode = 'slide'
  slide, _ = _eval(config, fake_eval_iterator)
  assert slide['mode'] == 'slide' and slide['window'] == [33, 33] and slide['stride'] == [22, 22]
  for key in ('miou', 'pixel_accuracy', 'num_pixels', 'per_class_iou', 'confusion_matrix',
              'trimap'):
    assert slide[key] == whole[key], key


def _large_iterator(sizes):
  """Eval batches of images larger than the 33x33 window, padded as the slide pipeline pads."""
  def create(config, *, mean_pixel, process_index=0, process_count=1):
    window, stride = sliding.eval_window(config)
    local = config.eval.batch_size // process_count
    examples = [fake_example(7, i, size) for i, size in enumerate(sizes)]

    def batches():
      for start in range(0, len(examples), local):
        rows = examples[start:start + local]
        shape = sliding.padded_size(np.max([r[1].shape for r in rows], 0), window, stride)
        image = np.broadcast_to(np.float32(mean_pixel), (local, *shape, 3)).copy()
        label = np.full((local, *shape), 255, np.int32)
        for i, (im, lab) in enumerate(rows):
          image[i, :im.shape[0], :im.shape[1]], label[i, :lab.shape[0], :lab.shape[1]] = im, lab
        size = np.int32([r[1].shape for r in rows] + [(0, 0)] * (local - len(rows)))
        yield {'image': image, 'label': label, 'valid': np.arange(local) < len(rows),
               'size': size}
    return batches(), len(examples)
  return create


def test_slide_evaluation_of_large_images_at_another_output_stride(tmp_path):
  config = tiny_config()
  config.eval.mode = 'slide'
  config.eval.output_stride = 8  # Trained at 16: one flag, as the scales.
  config.eval.scales = (1.25,)  # Scales and flips together: the _Probe tests above.
  config.eval.trimap_widths = (2, 8)
  config.eval.plots = False
  sizes = [(40, 50), (45, 48), (38, 41), (44, 52), (39, 47), (41, 49), (30, 46), (36, 53)]
  result, evaluator = _eval(config, _large_iterator(sizes))
  assert evaluator._step._cache_size() == 1  # Two batches of one shape: one compilation.
  assert result['output_stride'] == 8 and result['scales'] == [1.25]
  assert result['num_pixels'] > 0 and 0.0 <= result['miou'] <= 1.0
  assert [b['width'] for b in result['trimap']] == [2, 8]
  assert 0 < result['trimap'][0]['num_pixels'] < result['trimap'][1]['num_pixels']
  assert result['trimap'][1]['num_pixels'] <= result['num_pixels']
  # The predictor in slide mode gives each image's prediction alone; the evaluator's confusion
  # over the batches equals the one from those predictions.
  variables = random_variables(config)
  predictor = inference.Predictor(config, variables)
  confusion = np.zeros((3, 3), np.int64)
  for i, size in enumerate(sizes):
    image, label = fake_example(7, i, size)
    labels, _ = predictor(image)
    keep = label != 255
    np.add.at(confusion, (label[keep], labels[keep]), 1)
  np.testing.assert_array_equal(result['confusion_matrix'], confusion)


def test_predict_images_in_slide_mode_averages_the_window_logits(tmp_path):
  """The real model: logits of a 40x50 image from `predict_images` equal the numpy overlap
  average of the model's logits on each window alone."""
  config = tiny_config()
  config.eval.mode = 'slide'
  variables = random_variables(config)
  checkpoint.save_variables(tmp_path / 'wd', variables, step=3)
  image, _ = fake_example(9, 0, (40, 50))
  (tmp_path / 'in').mkdir()
  Image.fromarray(image.astype(np.uint8)).save(tmp_path / 'in' / 'big.png')
  inference.predict_images(config, tmp_path / 'wd', tmp_path / 'in', tmp_path / 'out',
                           save_logits=True)
  logits = np.load(tmp_path / 'out' / 'big_logits.npy')
  with Image.open(tmp_path / 'out' / 'big.png') as png:
    np.testing.assert_array_equal(np.asarray(png), logits.argmax(-1))
  mean = np.float32(models.mean_pixel(config.model.backbone))
  padded = inference.pad_image(image.astype(np.uint8), (55, 55), mean)  # padded_size(40, 50)
  model = models.build_model(config.model)
  window_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))
  total, count = np.zeros((55, 55, 3)), np.zeros((55, 55, 1))
  for y in (0, 22):
    for x in (0, 22):
      out = window_logits(variables, jnp.asarray(padded[None, y:y + 33, x:x + 33]))
      total[y:y + 33, x:x + 33] += np.asarray(out[0])
      count[y:y + 33, x:x + 33] += 1
  np.testing.assert_allclose(logits, (total / count)[:40, :50], rtol=1e-4, atol=1e-5)
