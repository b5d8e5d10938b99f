"""predict: label PNG, overlay and logits per image, at the input resolution, any image size."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import fake_example, random_variables, tiny_config
from PIL import Image

from deeplab_jax import checkpoint, inference, visualize


def test_padded_size():
  assert inference.padded_size((20, 30), (33, 33), 16) == (33, 33)
  assert inference.padded_size((40, 20), (33, 33), 16) == (49, 33)
  assert inference.padded_size((33, 34), (33, 33), 8) == (33, 41)
  assert inference.padded_size((513, 700), (513, 513), 16) == (513, 705)


def test_predict_writes_label_png_overlay_and_logits(tmp_path):
  config = tiny_config()
  checkpoint.save_variables(tmp_path / 'wd', random_variables(config), step=11)
  images = tmp_path / 'images'
  images.mkdir()
  sizes = {'small': (20, 27), 'large': (40, 50)}  # The eval crop is 33x33.
  for name, size in sizes.items():
    image, _ = fake_example(5, len(name), size)
    Image.fromarray(image.astype(np.uint8)).save(images / f'{name}.png')
  (images / 'notes.txt').write_text('not an image')
  out = tmp_path / 'out'
  written = inference.predict_images(config, tmp_path / 'wd', images, out, save_logits=True)
  assert len(written) == 6
  num_classes = config.model.num_classes
  for name, (h, w) in sizes.items():
    with Image.open(out / f'{name}.png') as label_png:
      assert label_png.mode == 'P' and label_png.size == (w, h)
      np.testing.assert_array_equal(label_png.getpalette()[:9], visualize.voc_palette()[:3].ravel())
      labels = np.asarray(label_png)
    with Image.open(out / f'{name}_overlay.png') as overlay:
      assert overlay.mode == 'RGB' and overlay.size == (w, h)
    logits = np.load(out / f'{name}_logits.npy')
    assert logits.shape == (h, w, num_classes) and logits.dtype == np.float32
    assert labels.max() < num_classes
    np.testing.assert_array_equal(labels, logits.argmax(-1))  # Single scale: argmax of logits.
  with pytest.raises(FileNotFoundError, match='neither an image file nor a directory'):
    inference.predict_images(config, tmp_path / 'wd', tmp_path / 'missing.jpg', out)


def test_pad_image_to_the_eval_crop():
  image = inference.pad_image(np.full((2, 3, 3), 9, np.uint8), (4, 5), (123.15, 115.90, 103.06))
  assert image.shape == (4, 5, 3) and image.dtype == np.float32
  np.testing.assert_array_equal(image[:2, :3], 9)
  np.testing.assert_array_equal(image[2:], np.broadcast_to(np.float32((123.15, 115.90, 103.06)), (2, 5, 3)))
  np.testing.assert_array_equal(image[:, 3:], np.broadcast_to(np.float32((123.15, 115.90, 103.06)), (4, 2, 3)))
  label = inference.pad_image(np.ones((2, 3), np.uint8), (4, 5), 255)
  assert label.dtype == np.uint8 and label[1, 2] == 1 and np.all(label[2:] == 255)
  with pytest.raises(ValueError, match='exceeds'):
    inference.pad_image(np.zeros((5, 9), np.uint8), (8, 8), 255)
