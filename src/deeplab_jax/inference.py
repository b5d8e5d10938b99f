"""Inference: single- or multi-scale prediction with flips, model variables from a checkpoint, and
segmenting image files.

`predict` is what evaluation and prediction both run: per scale the batch is resized bilinearly
(align_corners=True) to `int((size - 1) * scale + 1)`, run through the model, and its logits are
resized back to the input size; softmax probabilities are averaged over scales and left-right flips
and the argmax of that average is the prediction, as in the official multi-scale inference.
`predict_slide` does the same with the image cut into overlapping windows (`deeplab_jax.sliding`):
per scale and flip, each window is predicted as `predict` would predict it alone and the window
logits are averaged where windows overlap, before the softmax.
"""

from __future__ import annotations

import fractions
import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from deeplab_jax import caching, checkpoint, models, paths, sliding, validate, visualize
from deeplab_jax.config import apply_smoke, eval_output_stride
from deeplab_jax.errors import ConfigError
from deeplab_jax.models import layers

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


MAX_SYMBOLIC_SCALE_DENOMINATOR = 1024


def scaled_size(size: Sequence[Any], scale: float) -> tuple[Any, Any]:
  """The official `scale_dimension`: `int((dim - 1) * scale + 1)`, so that corners stay aligned.

  Symbolic sizes (a shape-polymorphic export) take `(dim - 1) * p // q + 1` for the scale p / q,
  the same number when q is a power of two (the official scales 0.5 ... 1.75); other scales are
  refused there.
  """
  if not layers.is_symbolic(*size[:2]):
    return tuple(int((int(d) - 1) * scale + 1) for d in size[:2])
  ratio = fractions.Fraction(scale)
  if ratio.denominator > MAX_SYMBOLIC_SCALE_DENOMINATOR:
    raise ConfigError(f'config.eval.scales: scale {scale} cannot resize a symbolic image size '
                      f'exactly; use multiples of 1/{MAX_SYMBOLIC_SCALE_DENOMINATOR} (e.g. 0.75) '
                      'or export at the fixed eval crop.')
  return tuple((d - 1) * ratio.numerator // ratio.denominator + 1 for d in size[:2])


def _logits(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, scale: float,
            flipped: bool) -> jax.Array:
  """float32 logits of `images` resized by `scale` (and flipped), back at the input size."""
  size = images.shape[1:3]
  x = images if scale == 1.0 else layers.resize_bilinear(images, scaled_size(size, scale))
  xi = x[:, :, ::-1] if flipped else x
  logits = model.apply(variables, xi, train=False).astype(jnp.float32)
  if flipped:
    logits = logits[:, :, ::-1]
  return layers.resize_bilinear(logits, size)


def _average(logits_per_view: Iterable[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(mean softmax, mean logits) over the views (scales x flips)."""
  probs, logits_sum, count = 0.0, 0.0, 0
  for logits in logits_per_view:
    probs = probs + jax.nn.softmax(logits, axis=-1)
    logits_sum = logits_sum + logits
    count += 1
  return probs / count, logits_sum / count


def _views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
  return [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]


def predict(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
            scales: Sequence[float] = (1.0,), flip: bool = False) -> tuple[jax.Array, jax.Array]:
  """(probabilities, logits) [B, H, W, C] of `images` [B, H, W, 3] in 0..255, at input size.

  Probabilities are the softmax averaged over scales and flips (the prediction is their argmax);
  logits are averaged likewise (single scale without flip: exactly the model's logits). Pure: jit it
  once per input shape.
  """
  return _average(_logits(model, variables, images, s, f) for s, f in _views(scales, flip))


def predict_slide(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                  window: Sequence[int], stride: Sequence[int], scales: Sequence[float] = (1.0,),
                  flip: bool = False, sizes: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """`predict` in sliding windows: (probabilities, logits) [B, H, W, C] of `images` [B, H, W, 3].

  Windows of `window` (clipped to the image) start at `sliding.window_starts`; all windows of the
  batch go through the model as one batch. Per scale and flip, each window's logits are those
  `predict` gives the window alone, and every pixel gets the mean logits of the windows covering it;
  softmax and averaging over scales and flips follow as in `predict`. `sizes` (int [B, 2], each
  image's own height and width) restricts each row to the windows inside its own
  `sliding.padded_size` (`sliding.window_weights`); pixels no window of the row covers get logits 0.
  None: every window counts. An image no larger than the window is exactly `predict`.
  """
  batch, height, width = images.shape[:3]
  win = (min(int(window[0]), height), min(int(window[1]), width))
  starts = [(y, x) for y in sliding.window_starts(height, win[0], int(stride[0]))
            for x in sliding.window_starts(width, win[1], int(stride[1]))]
  crops = jnp.concatenate([images[:, y:y + win[0], x:x + win[1]] for y, x in starts])
  weights = (jnp.ones((len(starts), batch), jnp.float32) if sizes is None
             else sliding.window_weights(starts, win, stride, sizes))
  coverage = jnp.zeros((batch, height, width, 1), jnp.float32)
  for k, (y, x) in enumerate(starts):
    coverage = coverage.at[:, y:y + win[0], x:x + win[1]].add(weights[k][:, None, None, None])

  def overlap_average(window_logits: jax.Array) -> jax.Array:
    window_logits = window_logits.reshape(len(starts), batch, *window_logits.shape[1:])
    total = jnp.zeros((batch, height, width, window_logits.shape[-1]), jnp.float32)
    for k, (y, x) in enumerate(starts):
      total = total.at[:, y:y + win[0], x:x + win[1]].add(
          window_logits[k] * weights[k][:, None, None, None])
    return jnp.where(coverage > 0, total / jnp.maximum(coverage, 1.0), 0.0)

  return _average(overlap_average(_logits(model, variables, crops, s, f))
                  for s, f in _views(scales, flip))


def labels(probabilities: jax.Array) -> jax.Array:
  """The prediction: int32 argmax over the classes of `predict`'s probabilities."""
  return jnp.argmax(probabilities, axis=-1).astype(jnp.int32)


def padded_size(size: Sequence[int], crop_size: Sequence[int], output_stride: int) -> tuple[int, int]:
  """The eval crop when the image fits in it, else the image size rounded up to k * OS + 1."""
  h, w = int(size[0]), int(size[1])
  if h <= crop_size[0] and w <= crop_size[1]:
    return int(crop_size[0]), int(crop_size[1])

  def round_up(d: int) -> int:
    return -(-(d - 1) // output_stride) * output_stride + 1

  return round_up(h), round_up(w)


def pad_image(array: np.ndarray, size: Sequence[int], fill: float | Sequence[float]) -> np.ndarray:
  """Pad an image [H, W, C] (fill: the mean pixel, as float32) or a label map [H, W] (fill: 255) at
  the bottom/right to `size`, as evaluation does; ValueError if it is larger than `size`."""
  height, width = array.shape[:2]
  out_h, out_w = int(size[0]), int(size[1])
  if height > out_h or width > out_w:
    raise ValueError(f'Image of size {height}x{width} exceeds {out_h}x{out_w}.')
  fill = np.asarray(fill)
  dtype = np.float32 if array.ndim == 3 else array.dtype
  out = np.empty((out_h, out_w, *array.shape[2:]), dtype)
  out[...] = fill.astype(dtype)
  out[:height, :width] = array
  return out


def load_variables(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   step: int | None = None) -> tuple[dict[str, Any], int]:
  """Params + batch_stats of checkpoint `step` (None: `config.eval.checkpoint_step` or latest) of
  `workdir`, checked against the model of `config` before anything is read; returns (variables,
  step)."""
  step = step if step is not None else config.eval.checkpoint_step
  return checkpoint.restore_variables(workdir, step,
                                      template=models.variable_shapes(config.model))


@caching.keyed_cache(maxsize=4, key=lambda config: caching.config_key(config.model, config.eval))
def predict_program(config: ml_collections.ConfigDict) -> Callable:
  """jit of (variables, images [B, H, W, 3]) -> (labels int32 [B, H, W], logits [B, H, W, C]) with
  `config.eval`'s mode, output stride, scales and flip: compiled once per input shape and reused
  by every `Predictor` of the same model and eval settings in this process."""
  model = models.build_model(config.model, eval_output_stride(config))
  scales, flip = tuple(float(s) for s in config.eval.scales), bool(config.eval.flip)
  if config.eval.mode == 'slide':
    window, stride = sliding.eval_window(config)
    infer = functools.partial(predict_slide, model, window=window, stride=stride, scales=scales,
                              flip=flip)
  else:
    infer = functools.partial(predict, model, scales=scales, flip=flip)

  def labels_and_logits(variables, images):
    probs, logits = infer(variables, images)
    return labels(probs), logits

  return jax.jit(labels_and_logits)


def input_size(config: ml_collections.ConfigDict, size: Sequence[int]) -> tuple[int, int]:
  """What an image of `size` is padded to for inference: `padded_size` in whole mode,
  `sliding.padded_size` in slide mode."""
  if config.eval.mode == 'slide':
    return sliding.padded_size(size, *sliding.eval_window(config))
  return padded_size(size, config.eval.crop_size, eval_output_stride(config))


class Predictor:
  """Inference of one image at a time with the evaluator's mode, output stride, scales and flip."""

  def __init__(self, config: ml_collections.ConfigDict, variables: Mapping[str, Any]):
    self.config = config
    self.output_stride = eval_output_stride(config)
    self.mean_pixel = np.asarray(models.mean_pixel(config.model.backbone), np.float32)
    self.variables = jax.device_put({'params': variables['params'],
                                     'batch_stats': variables['batch_stats']})
    self._fn = predict_program(config)
    self._sizes: set[tuple[int, int]] = set()

  def __call__(self, image: np.ndarray) -> tuple[np.ndarray, jax.Array]:
    """(labels int32 [H, W], logits [H, W, C] as a device array) of a uint8/float RGB image.

    Whole mode: the image is padded with the mean pixel to `config.eval.crop_size` (or, if larger,
    to its own size rounded up to k * output_stride + 1). Slide mode: to `sliding.padded_size`.
    One compilation per padded size; the outputs are cropped back to the image.
    """
    h, w = image.shape[:2]
    size = input_size(self.config, (h, w))
    if size != tuple(self.config.eval.crop_size) and size not in self._sizes:
      logging.info('Image of %dx%d: padding it to %dx%d for config.eval.mode=%r, crop_size=%s '
                   '(compiles once per new size).', h, w, *size, self.config.eval.mode,
                   tuple(self.config.eval.crop_size))
    self._sizes.add(size)
    padded = pad_image(np.asarray(image)[..., :3], size, self.mean_pixel)[None]
    labels, logits = self._fn(self.variables, padded)
    return np.asarray(labels[0, :h, :w]), logits[0, :h, :w]


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


def _progress(items: Sequence[str]) -> Iterable[str]:
  try:
    from tqdm import tqdm  # noqa: PLC0415 - optional.
  except ImportError:  # Plain logging without tqdm.
    for i, item in enumerate(items):
      logging.info('[%d/%d] %s', i + 1, len(items), item)
      yield item
    return
  yield from tqdm(items, desc='predict', unit='image')


def predict_images(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   inputs: str | os.PathLike, output_dir: str | os.PathLike,
                   save_logits: bool = False) -> list[str]:
  """Segment the image(s) at `inputs` with the checkpoint of `workdir`; returns the written paths.

  For every input `<stem>.<ext>` it writes `<stem>.png` (the label map as a VOC-palette PNG: pixel
  values are class ids), `<stem>_overlay.png` and, with `save_logits`, `<stem>_logits.npy` (float32
  [H, W, num_classes] at the input resolution). Paths may be URLs.
  """
  config = apply_smoke(config)
  validate.validate_config(config, mode='predict')
  files = list_images(inputs)
  stems = [os.path.splitext(paths.basename(f))[0] for f in files]
  repeated = sorted({s for s in stems if stems.count(s) > 1})
  if repeated:
    raise ValueError(f'Several inputs share the name(s) {repeated}; their outputs would '
                     'overwrite each other. Rename them or predict them separately.')
  variables, step = load_variables(config, workdir)
  logging.info('Predicting %d image(s) with checkpoint step %d of %s.', len(files), step, workdir)
  predictor = Predictor(config, variables)
  palette = visualize.voc_palette()
  output_dir = os.fspath(output_dir)
  paths.makedirs(output_dir)
  written = []
  for path, stem in zip(_progress(files), stems, strict=True):
    with paths.open_file(path, 'rb') as f, Image.open(f) as im:
      image = np.asarray(im.convert('RGB'))
    labels, logits = predictor(image)
    written.append(visualize.write_label_png(paths.join(output_dir, f'{stem}.png'), labels,
                                             palette))
    written.append(visualize.write_png(
        paths.join(output_dir, f'{stem}_overlay.png'),
        visualize.overlay(image, visualize.colorize(labels, palette))))
    if save_logits:
      out = paths.join(output_dir, f'{stem}_logits.npy')
      with paths.open_file(out, 'wb') as f:
        np.save(f, np.asarray(logits, np.float32))
      written.append(out)
  return written
