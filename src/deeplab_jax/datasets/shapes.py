"""`deeplab_shapes`: a procedurally generated segmentation dataset that needs no download.

Five object classes that differ in both shape and texture (striped disks, checkered squares, dotted
triangles, speckled rings, ringed crosses) lie, partly occluding each other, on a smooth coloured
background cluttered with small blobs and lines. As in PASCAL VOC, a thin band of label 255 (ignore)
surrounds every object outline. Everything is a pure function of the builder config's seed, so two
builds are identical. It lets the whole stack (input pipeline, training, evaluation) run end to end on
a laptop CPU in minutes, with a model that can actually learn something.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from deeplab_jax.datasets import spec

CLASS_NAMES = ('background', 'disk', 'square', 'triangle', 'ring', 'cross')
NUM_CLASSES = len(CLASS_NAMES)

# Per class: (colour a, colour b) that its texture pattern mixes. Background clutter uses random
# colours, so colour alone is a cue, not a give-away; the pattern and the outline decide.
_CLASS_COLOURS = {
    1: ((205, 45, 40), (245, 150, 60)),  # disk: red/orange stripes
    2: ((35, 150, 55), (15, 75, 25)),  # square: green checkerboard
    3: ((45, 75, 195), (195, 215, 255)),  # triangle: blue with pale dots
    4: ((225, 200, 40), (120, 95, 10)),  # ring: yellow speckled with brown
    5: ((150, 50, 170), (235, 170, 240)),  # cross: purple concentric rings
}
# Size factors that give every class about the area of a square of side 1.6 * radius.
_SIZE_FACTOR = {1: 0.9, 2: 1.05, 3: 1.25, 4: 1.05, 5: 1.1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """How many examples, how big, how crowded; `seed` fixes everything else."""

  num_train: int = 1000
  num_validation: int = 100
  min_side: int = 80  # Image height and width are drawn independently from [min_side, max_side].
  max_side: int = 112
  min_objects: int = 2
  max_objects: int = 5
  min_radius: int = 12  # Object size in pixels (scaled per class so that areas are comparable).
  max_radius: int = 26
  num_clutter: tuple[int, int] = (6, 16)  # Background blobs and lines per image (min, max).
  band: int = 1  # Ignore band: pixels within this Chebyshev distance of an outline become 255.
  seed: int = 0


class DeeplabShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes on cluttered backgrounds, labels 0..5 and 255 (ignore) around outlines."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      ShapesConfig(name='default', description='1000 train / 100 validation images, 80-112 px.'),
      ShapesConfig(name='tiny', description='24 train / 8 validation images, for tests.',
                   num_train=24, num_validation=8, min_side=48, max_side=64, min_radius=6,
                   max_radius=14, num_clutter=(2, 6)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1)),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation_mask'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    return {
        'train': self._generate_examples('train', c.num_train),
        'validation': self._generate_examples('validation', c.num_validation),
    }

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict]]:
    split_id = {'train': 0, 'validation': 1}[split]
    for i in range(count):
      image, mask = generate_example(self.builder_config, split_id, i)
      name = f'{split}_{i:05d}.png'
      yield name, {'image': _png(image), 'segmentation_mask': _png(mask), 'file_name': name}


def _png(array: np.ndarray) -> bytes:
  """PNG bytes via PIL: several times faster than TFDS's own per-example TF encode."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def generate_example(config: ShapesConfig, split_id: int, index: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Image (H, W, 3) uint8 and label (H, W) uint8 of example `index`: a pure function of its args."""
  rng = np.random.default_rng([config.seed, split_id, index])
  h, w = rng.integers(config.min_side, config.max_side + 1, size=2)
  grid = np.mgrid[:h, :w].astype(np.float32)
  image = _background(rng, grid)
  label = np.zeros((h, w), np.uint8)

  for _ in range(rng.integers(config.num_clutter[0], config.num_clutter[1] + 1)):
    _draw_clutter(rng, image, label, grid)
  for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
    _draw_object(rng, image, label, grid, int(rng.integers(1, NUM_CLASSES)), config)
  if rng.random() < 0.3:  # Now and then a line crosses in front of the objects too.
    _draw_clutter(rng, image, label, grid, kind='line')
  label = _ignore_band(label, config.band)
  return np.clip(image, 0, 255).astype(np.uint8), label


def _background(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
  """A smooth random colour field (bilinear upsampling of a coarse grid) plus faint waves."""
  _, h, w = grid.shape
  coarse = rng.uniform(50, 200, (5, 5, 3)).astype(np.float32)
  coarse = 0.6 * coarse + 0.4 * coarse.mean(-1, keepdims=True)  # Muted colours.
  ay, ax = _interp_matrix(h, 5), _interp_matrix(w, 5)
  field = np.tensordot(np.tensordot(ay, coarse, axes=1), ax, axes=([1], [1]))  # (h, 3, w)
  field = field.transpose(0, 2, 1)
  theta, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
  k = 2 * np.pi / period
  waves = np.sin(grid[1] * np.float32(k * np.cos(theta)) + grid[0] * np.float32(k * np.sin(theta)))
  return field + np.float32(rng.uniform(0, 15)) * waves[..., None]


def _interp_matrix(n: int, k: int) -> np.ndarray:
  """(n, k) weights that linearly interpolate k evenly spaced samples to n points."""
  pos = np.linspace(0, k - 1, n)
  return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(k)[None, :])).astype(np.float32)


def _local_frame(rng: np.random.Generator, grid: np.ndarray, cy: float, cx: float, extent: float):
  """Clipped bbox slices around (cy, cx) and rotated coordinates (u, v) inside it (None if empty)."""
  _, h, w = grid.shape
  y0, y1 = max(0, int(cy - extent)), min(h, int(cy + extent) + 2)
  x0, x1 = max(0, int(cx - extent)), min(w, int(cx + extent) + 2)
  if y0 >= y1 or x0 >= x1:
    return None
  dy, dx = grid[0, y0:y1, x0:x1] - cy, grid[1, y0:y1, x0:x1] - cx
  theta = rng.uniform(0, 2 * np.pi)
  cos, sin = np.cos(theta), np.sin(theta)
  return (slice(y0, y1), slice(x0, x1)), dx * cos + dy * sin, dy * cos - dx * sin


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
  """Inside-test of class `cls`'s outline at size `s` in the object's own frame."""
  r = np.hypot(u, v)
  if cls == 1:
    return r <= s
  if cls == 2:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.75 * s
  if cls == 3:
    inside = np.ones(u.shape, bool)
    for k in range(3):
      a = np.pi / 2 + k * 2 * np.pi / 3
      inside &= u * np.cos(a) + v * np.sin(a) <= 0.55 * s
    return inside
  if cls == 4:
    return (r <= s) & (r >= 0.5 * s)
  arm = 0.3 * s
  return ((np.abs(u) <= arm) & (np.abs(v) <= s)) | ((np.abs(v) <= arm) & (np.abs(u) <= s))


def _texture(rng: np.random.Generator, cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Class `cls`'s pattern as a 0/1 mixing weight between its two colours."""
  if cls == 1:
    return (np.floor(u / 4.0) % 2).astype(np.float32)
  if cls == 2:
    return ((np.floor(u / 4.0) + np.floor(v / 4.0)) % 2).astype(np.float32)
  if cls == 3:
    return ((np.mod(u, 6.0) - 3.0) ** 2 + (np.mod(v, 6.0) - 3.0) ** 2 < 2.5).astype(np.float32)
  if cls == 4:
    return (rng.random(u.shape) < 0.3).astype(np.float32)
  return (np.floor(np.hypot(u, v) / 3.0) % 2).astype(np.float32)


def _draw_object(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, grid: np.ndarray,
                 cls: int, config: ShapesConfig) -> None:
  """Paint one object of class `cls` over whatever is there (later objects occlude earlier)."""
  h, w = label.shape
  s = rng.uniform(config.min_radius, config.max_radius) * _SIZE_FACTOR[cls]
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  frame = _local_frame(rng, grid, cy, cx, 1.2 * s + 1)
  if frame is None:
    return
  box, u, v = frame
  inside = _shape_mask(cls, u, v, s)
  a, b = (np.asarray(c, np.float64) + rng.normal(0, 12, 3) for c in _CLASS_COLOURS[cls])
  t = _texture(rng, cls, u, v)[..., None]
  colour = (1 - t) * a + t * b
  image[box][inside] = colour[inside]
  label[box][inside] = cls


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, grid: np.ndarray,
                  kind: str | None = None) -> None:
  """Paint a small random-coloured blob or line that belongs to the background (label 0)."""
  h, w = label.shape
  kind = kind or ('blob' if rng.random() < 0.6 else 'line')
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  if kind == 'blob':
    ry, rx = rng.uniform(2, 7, size=2)
    frame = _local_frame(rng, grid, cy, cx, max(ry, rx) + 1)
    if frame is None:
      return
    box, u, v = frame
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1
  else:
    half_len, half_width = rng.uniform(5, 18), rng.uniform(0.5, 1.2)
    frame = _local_frame(rng, grid, cy, cx, half_len + 2)
    if frame is None:
      return
    box, u, v = frame
    inside = (np.abs(u) <= half_len) & (np.abs(v) <= half_width)
  image[box][inside] = rng.uniform(0, 255, 3)
  label[box][inside] = 0


def _ignore_band(label: np.ndarray, band: int) -> np.ndarray:
  """Set to 255 every pixel with a differently labelled pixel within Chebyshev distance `band`."""
  if band <= 0:
    return label
  h, w = label.shape
  padded = np.pad(label, band, mode='edge')
  edge = np.zeros((h, w), bool)
  for dy in range(-band, band + 1):
    for dx in range(-band, band + 1):
      edge |= padded[band + dy:band + dy + h, band + dx:band + dx + w] != label
  out = label.copy()
  out[edge] = spec.IGNORE_LABEL
  return out


def ensure_prepared(data_dir: str | os.PathLike | None, config: str = 'default'
                    ) -> tfds.core.DatasetBuilder:
  """Build `deeplab_shapes/<config>` under `data_dir` unless it is there already (a few seconds)."""
  builder = tfds.builder(f'deeplab_shapes/{config}', data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


SPEC = spec.register(spec.DatasetSpec('deeplab_shapes', NUM_CLASSES, CLASS_NAMES))
