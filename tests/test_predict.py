"""predict: label PNG, overlay and logits per image, at the input resolution, any image size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_train import fake_example, random_variables, tiny_config

from deeplab_jax import checkpoint, evaluate, predict


def test_padded_size():
  assert predict.padded_size((20, 30), (33, 33), 16) == (33, 33)
  assert predict.padded_size((40, 20), (33, 33), 16) == (49, 33)
  assert predict.padded_size((33, 34), (33, 33), 8) == (33, 41)
  assert predict.padded_size((513, 700), (513, 513), 16) == (513, 705)


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
  written = predict.predict_images(config, tmp_path / 'wd', images, out, save_logits=True)
  assert len(written) == 6
  num_classes = config.model.num_classes
  for name, (h, w) in sizes.items():
    with Image.open(out / f'{name}.png') as label_png:
      assert label_png.mode == 'P' and label_png.size == (w, h)
      np.testing.assert_array_equal(label_png.getpalette()[:9], evaluate.voc_palette()[:3].ravel())
      labels = np.asarray(label_png)
    with Image.open(out / f'{name}_overlay.png') as overlay:
      assert overlay.mode == 'RGB' and overlay.size == (w, h)
    logits = np.load(out / f'{name}_logits.npy')
    assert logits.shape == (h, w, num_classes) and logits.dtype == np.float32
    assert labels.max() < num_classes
    np.testing.assert_array_equal(labels, logits.argmax(-1))  # Single scale: argmax of logits.
  with pytest.raises(FileNotFoundError, match='neither an image file nor a directory'):
    predict.predict_images(config, tmp_path / 'wd', tmp_path / 'missing.jpg', out)
