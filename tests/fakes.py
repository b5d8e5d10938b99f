"""Test helpers shared by the test modules: a fake dataset and its iterators, the tiny config on
it, random model variables, and the shared compilation cache."""

from __future__ import annotations

import tempfile

import jax
import ml_collections
import numpy as np

from deeplab_jax import config as config_lib
from deeplab_jax import datasets, models


def use_compilation_cache() -> None:
  """Share compiled programs between tests: they build the same tiny model many times (fresh
  `jax.jit` objects), and an XLA:CPU compile of its train step takes tens of seconds."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='deeplab_jax_xla_'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


use_compilation_cache()

FAKE_DATASET = 'fake_squares'
FAKE_CLASSES = ('background', 'bright', 'dark')
datasets.register(datasets.DatasetSpec(FAKE_DATASET, len(FAKE_CLASSES), FAKE_CLASSES))


def fake_example(seed: int, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A noisy image with one bright and one dark square (labels 1, 2) and an ignore band."""
  rng = np.random.default_rng([seed, index])
  h, w = size
  image = rng.normal(120.0, 20.0, (h, w, 3)).astype(np.float32)
  label = np.zeros((h, w), np.int32)
  for cls, value in ((1, 230.0), (2, 15.0)):
    s = int(rng.integers(h // 5, h // 2))
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    image[y:y + s, x:x + s] = value + rng.normal(0, 10.0, (s, s, 3))
    label[y:y + s, x:x + s] = cls
    label[y, x:x + s] = 255  # A one-pixel ignore band on the top edge.
  return np.clip(image, 0, 255), label


def fake_train_iterator(config, *, mean_pixel, process_index=0, process_count=1, start_step=0):
  """Same contract as input_pipeline.create_train_iterator: batches a pure function of the step."""
  del mean_pixel
  local = config.train.batch_size // process_count
  step = start_step
  while True:
    rows = [fake_example(config.train.seed, step * config.train.batch_size + process_index * local
                         + i, config.train.crop_size) for i in range(local)]
    yield {'image': np.stack([r[0] for r in rows]), 'label': np.stack([r[1] for r in rows])}
    step += 1


def fake_eval_iterator(config, *, mean_pixel, process_index=0, process_count=1, num_images=6):
  """Same contract as input_pipeline.create_eval_iterator (whole mode): smaller images padded to
  the crop."""
  local = config.eval.batch_size // process_count
  h, w = config.eval.crop_size
  examples = [fake_example(1000, i, (h - 8, w - 4)) for i in range(num_images)]

  def batches():
    for start in range(0, num_images, config.eval.batch_size):
      image = np.broadcast_to(np.asarray(mean_pixel, np.float32), (local, h, w, 3)).copy()
      label = np.full((local, h, w), 255, np.int32)
      valid = np.zeros(local, bool)
      size = np.zeros((local, 2), np.int32)
      for i in range(local):
        j = start + process_index * local + i
        if j < num_images:
          image[i, :h - 8, :w - 4], label[i, :h - 8, :w - 4] = examples[j]
          valid[i] = True
          size[i] = (h - 8, w - 4)
      yield {'image': image, 'label': label, 'valid': valid, 'size': size}

  return batches(), num_images


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
  """`config.tiny_config` on the fake dataset (3 classes, 33x33 eval crops, official BN decays, no
  trimaps or charts)."""
  c = config_lib.tiny_config()
  c.model.num_classes = len(FAKE_CLASSES)
  c.model.bn_decay = None
  c.data.dataset = FAKE_DATASET
  c.eval.crop_size = (33, 33)
  c.eval.trimap_widths = ()  # Tests of trimaps and charts turn them on.
  c.eval.plots = False
  for k, v in train_overrides.items():
    c.train[k] = v
  return c



def random_variables(config, seed: int = 0) -> dict:
  """Model variables with random values, without compiling the model's initialisers."""
  shapes = models.variable_shapes(config.model)
  rng = np.random.default_rng(seed)
  def value(path, s):
    name = jax.tree_util.keystr(path)
    if 'moving_variance' in name or 'gamma' in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if 'moving_mean' in name or 'beta' in name or 'biases' in name:
      scale = 0.1
    elif 'logits' in name:
      scale = 0.01  # As the model's own logits initialiser.
    else:
      scale = np.sqrt(2.0 / max(1, int(np.prod(s.shape[:-1]))))
    return (rng.normal(size=s.shape) * scale).astype(np.float32)
  return jax.tree_util.tree_map_with_path(value, dict(shapes))
