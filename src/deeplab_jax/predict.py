"""Segment images with a trained checkpoint.

  python -m deeplab_jax.predict --config=configs/shapes.py --workdir=/tmp/wd \\
      --input=IMAGE_OR_DIR --output=OUT [--save_logits]

For every input image `<stem>.<ext>` it writes `<stem>.png` (the label map as a palette PNG, VOC
palette: pixel values are class ids), `<stem>_overlay.png` (the colours blended over the image) and,
with `--save_logits`, `<stem>_logits.npy` (float32 [H, W, num_classes] at the input resolution).
`--input`, `--output` and `--workdir` may be URLs (`gs://bucket/dir`).

Inference is the evaluator's (`evaluate.predict`): `config.eval.output_stride`, `scales` and `flip`
apply, and the label map is the argmax of the softmax averaged over scales and flips. The saved
logits are averaged the same way (single scale without flip: the model's logits). Images are padded
with the mean pixel to `config.eval.crop_size` and the result is cropped back; an image larger than
the crop is padded to its own size rounded up to `k * output_stride + 1` (one extra compilation per
new size) instead, so nothing is ever resized or cut.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from deeplab_jax import evaluate, models, paths, train

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
OVERLAY_ALPHA = 0.5


def list_images(path: str | os.PathLike) -> list[str]:
  """`path` itself, or the image files directly inside directory `path`, sorted (local or URL)."""
  path = os.fspath(path)
  target = paths.to_epath(path)
  if target.is_dir():
    files = sorted(paths.join(path, f.name) for f in target.iterdir()
                   if f.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in directory {path!r}.')
    return files
  if not target.is_file():
    raise FileNotFoundError(f'--input={path!r} is neither an image file nor a directory.')
  return [path]


def padded_size(size: Sequence[int], crop_size: Sequence[int], output_stride: int) -> tuple[int, int]:
  """The eval crop when the image fits in it, else the image size rounded up to k * OS + 1."""
  h, w = int(size[0]), int(size[1])
  if h <= crop_size[0] and w <= crop_size[1]:
    return int(crop_size[0]), int(crop_size[1])
  up = lambda d: -(-(d - 1) // output_stride) * output_stride + 1  # noqa: E731
  return up(h), up(w)


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """`colours` blended over `image` (both uint8 RGB)."""
  blend = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


class Predictor:
  """Inference of one image at a time with the evaluator's multi-scale/flip settings."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict[str, Any]):
    self.config = config
    self.output_stride = config.eval.get('output_stride') or config.model.output_stride
    model = models.build_model(config.model, self.output_stride)
    self.mean_pixel = np.asarray(models.mean_pixel(config.model.backbone), np.float32)
    self.variables = jax.device_put({'params': variables['params'],
                                     'batch_stats': variables['batch_stats']})
    infer = functools.partial(evaluate.predict, model, scales=tuple(config.eval.scales),
                              flip=bool(config.eval.flip))

    def labels_and_logits(variables, images):
      probs, logits = infer(variables, images)
      return jnp.argmax(probs, axis=-1).astype(jnp.int32), logits

    self._fn = jax.jit(labels_and_logits)
    self._sizes: set[tuple[int, int]] = set()

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, jax.Array]:
    """(labels int32 [H, W], logits [H, W, C] as a device array) of a uint8/float RGB image."""
    h, w = image.shape[:2]
    size = padded_size((h, w), self.config.eval.crop_size, self.output_stride)
    if size != tuple(self.config.eval.crop_size) and size not in self._sizes:
      logging.info('Image of %dx%d is larger than config.eval.crop_size=%s: padding it to %dx%d '
                   '(compiles once per new size).', h, w, tuple(self.config.eval.crop_size), *size)
    self._sizes.add(size)
    padded = np.broadcast_to(self.mean_pixel, (1, *size, 3)).copy()
    padded[0, :h, :w] = image[..., :3]
    labels, logits = self._fn(self.variables, padded)
    return np.asarray(labels[0, :h, :w]), logits[0, :h, :w]


def _progress(items: Sequence[str]) -> Iterable[str]:
  try:
    from tqdm import tqdm
  except ImportError:  # Plain logging without tqdm.
    for i, item in enumerate(items):
      logging.info('[%d/%d] %s', i + 1, len(items), item)
      yield item
    return
  yield from tqdm(items, desc='predict', unit='image')


def predict_images(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   inputs: str | os.PathLike, output_dir: str | os.PathLike,
                   save_logits: bool = False) -> list[str]:
  """Segment the image(s) at `inputs` with the checkpoint of `workdir`; returns written paths."""
  config = train.apply_smoke(config)
  files = list_images(inputs)
  stems = [os.path.splitext(paths.basename(f))[0] for f in files]
  duplicates = sorted({s for s in stems if stems.count(s) > 1})
  if duplicates:
    raise ValueError(f'Several inputs share the name(s) {duplicates}; their outputs would '
                     'overwrite each other. Rename them or predict them separately.')
  variables, step = evaluate.load_variables(config, workdir)
  logging.info('Predicting %d image(s) with checkpoint step %d of %s.', len(files), step, workdir)
  predictor = Predictor(config, variables)
  palette = evaluate.voc_palette()
  output_dir = os.fspath(output_dir)
  paths.makedirs(output_dir)
  written = []
  for path, stem in zip(_progress(files), stems, strict=True):
    with paths.open(path, 'rb') as f, Image.open(f) as im:
      image = np.asarray(im.convert('RGB'))
    labels, logits = predictor(image)
    label_png = Image.fromarray(labels.astype(np.uint8))
    label_png.putpalette(palette.reshape(-1).tolist())
    out = paths.join(output_dir, f'{stem}.png')
    with paths.open(out, 'wb') as f:
      label_png.save(f, format='PNG')
    written.append(out)
    out = paths.join(output_dir, f'{stem}_overlay.png')
    with paths.open(out, 'wb') as f:
      Image.fromarray(overlay(image, evaluate.colorize(labels, palette))).save(f, format='PNG')
    written.append(out)
    if save_logits:
      out = paths.join(output_dir, f'{stem}_logits.npy')
      with paths.open(out, 'wb') as f:
        np.save(f, np.asarray(logits, np.float32))
      written.append(out)
  return written


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (main.py defines its own)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (as for training).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir (or checkpoints dir) with a checkpoint.')
  flags.DEFINE_string('input', None, 'An image file or a directory of images.')
  flags.DEFINE_string('output', None, 'Directory for the outputs.')
  flags.DEFINE_bool('save_logits', False, 'Also write <stem>_logits.npy.')
  flags.mark_flags_as_required(['config', 'workdir', 'input', 'output'])


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  paths = predict_images(f.config, f.workdir, f.input, f.output, f.save_logits)
  logging.info('Wrote %d files to %s.', len(paths), f.output)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
