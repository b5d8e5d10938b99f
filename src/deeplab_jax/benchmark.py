"""Time a model's train step or inference: `python -m deeplab_jax.benchmark --config=CONFIG`.

    python -m deeplab_jax.benchmark --config=configs/voc_xception.py --mode=infer --batch=1
    python -m deeplab_jax.benchmark --config=configs/voc_xception.py --mode=train --batch=4 \
        --steps=5 --config.model.depthwise_impl=grouped

Runs on random data at the config's crop (`train.crop_size` for `--mode=train`, `eval.crop_size` for
`--mode=infer`; one forward pass at scale 1, no flip) and prints one JSON object:
- `compile_s`: lowering plus XLA compilation of the jitted step;
- `step_time_median_s`, `step_time_min_s`: over `--steps` timed steps after `--warmup` untimed ones,
  each waited for with `block_until_ready`; `images_per_s` from the median;
- `peak_memory_bytes`: the device's `memory_stats()` peak where the backend has one, else the
  process's peak resident set size (`peak_memory_source` says which);
- `multiply_adds`: per image, one forward pass, from `deeplab_jax.flops`;
- `flops_per_s`: 2 * multiply_adds * images_per_s, times 3 in train mode (forward plus backward
  counted as three forward passes; `flops_convention` says so);
- `matmul_flops_per_s`: a jitted square matmul of the model's dtype (`--matmul_size`), timed after
  each step so that both see the same machine load, and `peak_fraction` = `flops_per_s` /
  `matmul_flops_per_s` (both from median times);
- `compiled_temp_bytes`: the step's scratch memory (activations kept for the backward pass, ...) as
  XLA planned it (`memory_analysis()`), where the backend reports it;
- `compile_cpu_s`: the compile's process CPU time, a steadier figure than `compile_s` on a busy
  machine; `load_average`: the machine's load at the end.

The train step is the one training runs (`deeplab_jax.train.make_train_step`, the default);
`--train_step=minimal` times a bare stand-in instead (SGD momentum with weight decay, cross-entropy
ignoring label 255, BatchNorm statistics updated, state donated) to see the trainer's overhead; the
`train_step` field says which ran. Variables are random (`synthetic_variables`), not `model.init`'s. A batch divisible by the
device count is sharded over all devices (`devices_used`), else it runs on one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from deeplab_jax import flops, losses, models
from deeplab_jax.models import layers

IGNORE_LABEL = losses.IGNORE_LABEL
MODES = ('train', 'infer')


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def matmul_reference(size: int = 2048, dtype: Any = jnp.float32) -> tuple[Callable[[], Any], float]:
  """(call, flops): a compiled, warmed-up `size`^3 matmul of `dtype` and its FLOP count."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  return lambda: matmul(a, b), 2.0 * size**3


def matmul_flops_per_s(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> dict:
  """FLOP/s of a jitted `size`^3 matmul of `dtype`: {'size', 'median', 'max'} over `repeats`."""
  call, work = matmul_reference(size, dtype)
  times = [_timed(call) for _ in range(repeats)]
  return {'size': size, 'median': work / statistics.median(times), 'max': work / min(times)}


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the largest device `peak_bytes_in_use`, else the process peak RSS."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the API raise various errors.
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  if peaks:
    return max(peaks), 'device_memory_stats'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024), 'process_peak_rss'


def multiply_adds(config: ml_collections.ConfigDict, crop: Sequence[int],
                  output_stride: int) -> int:
  """Multiply-adds of one forward pass of one image at `crop` and `output_stride`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.output_stride = output_stride
  config.eval.scales = (1.0,)
  config.eval.flip = False
  return int(flops.count(config, crop_size=tuple(crop))['multiply_adds'])


def synthetic_variables(model: models.DeepLab, crop: Sequence[int], seed: int = 0) -> dict:
  """Variables shaped as `model.init`'s, filled on the host: He-normal kernels, BN identity.

  `model.init`, jitted or not, can take minutes on a busy CPU for a full-size model (it compiles or
  dispatches every initializer); the timings do not depend on the values, so they are drawn here.
  """
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *crop, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('gamma', 'moving_variance'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('weights', 'depthwise_weights'):
      fan_in = math.prod(leaf.shape[:-2]) * (leaf.shape[-2] if name == 'weights' else 1)
      scale = math.sqrt(2.0 / fan_in)
      return (rng.standard_normal(leaf.shape, np.float32) * scale).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def minimal_train_step(model: models.DeepLab, config: ml_collections.ConfigDict,
                       ) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, step): SGD momentum + weight decay on cross-entropy; step(state, batch, rng).

  A stand-in for `deeplab_jax.train.make_train_step` (`train_step='minimal'`)."""
  optimizer = optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                          optax.sgd(config.optim.base_lr, momentum=config.optim.momentum))

  def step(state: dict, batch: dict, rng: jax.Array) -> tuple[dict, jax.Array]:
    dropout_key = jax.random.fold_in(rng, state['step'])

    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state['batch_stats']}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': dropout_key})
      return losses.segmentation_loss(logits, batch['label']), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return dict(params=params, batch_stats=batch_stats, opt_state=opt_state,
                step=state['step'] + 1), loss

  return optimizer, step


def _trainer_step(config: ml_collections.ConfigDict, model: models.DeepLab, variables: dict,
                  mesh: Mesh) -> tuple[Any, Callable]:
  """(state, jitted step) of `deeplab_jax.train`: the step training runs, with its optimizer."""
  from deeplab_jax import optim  # noqa: PLC0415 - the trainer's imports are heavy (clu, orbax).
  from deeplab_jax import train as trainer  # noqa: PLC0415

  tx = optim.create_optimizer(config, variables['params'])
  state = trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']),
      nonfinite_step=jnp.full((), -1, jnp.int32))
  return state, trainer.make_train_step(config, model, tx, mesh)


def _mesh(batch: int) -> Mesh:
  """A ('data',) mesh over all devices if `batch` splits evenly over them, else over one."""
  n = jax.device_count() if batch % jax.device_count() == 0 else 1
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


@dataclasses.dataclass
class Prepared:
  """A compiled step ready to time: `call()` runs one step (state threaded through in train mode)."""

  call: Callable[[], Any]
  mode: str
  batch: int
  multiply_adds: int
  dtype: Any
  info: dict  # Settings and compile times, the first fields of the result.
  compiled: Any = None  # The `jax.stages.Compiled` step (its HLO: `compiled.as_text()`).


def prepare(config: ml_collections.ConfigDict, mode: str = 'infer', batch: int | None = None,
            train_step: str = 'auto', compiler_options: dict[str, Any] | None = None) -> Prepared:
  """Build, lower and compile `config`'s train step or inference on random data.

  `train_step`: 'trainer' (`deeplab_jax.train.make_train_step`), 'minimal' (`minimal_train_step`)
  or 'auto' (the trainer's). `compiler_options`: XLA debug options
  for this compile only (e.g. {'xla_cpu_enable_fast_math': True}).
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  train = mode == 'train'
  batch = int(batch or (config.train.batch_size if train else config.eval.batch_size))
  crop = tuple(int(s) for s in (config.train.crop_size if train else config.eval.crop_size))
  output_stride = (config.model.output_stride if train
                   else config.eval.get('output_stride') or config.model.output_stride)
  model = models.build_model(config.model, output_stride)
  dtype = models.DTYPES[config.model.get('dtype', 'float32')]
  mesh = _mesh(batch)
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  key_images, key_labels, key_ignore, key_step = jax.random.split(
      jax.random.key(config.train.seed), 4)
  images = jax.random.uniform(key_images, (batch, *crop, 3), jnp.float32, 0.0, 255.0)
  images = jax.device_put(images, data_sharding)
  variables = jax.device_put(synthetic_variables(model, crop, config.train.seed), replicated)

  if train:
    labels = jax.random.randint(key_labels, (batch, *crop), 0, config.model.num_classes)
    labels = jnp.where(jax.random.uniform(key_ignore, labels.shape) < 0.1, IGNORE_LABEL, labels)
    batch_data = {'image': images,
                  'label': jax.device_put(labels.astype(jnp.int32), data_sharding)}
    if train_step == 'auto':
      train_step = 'trainer'
    if train_step == 'trainer':
      state, jitted = _trainer_step(config, model, variables, mesh)
    elif train_step == 'minimal':
      optimizer, step_fn = minimal_train_step(model, config)
      state = dict(params=variables['params'], batch_stats=variables['batch_stats'],
                   opt_state=optimizer.init(variables['params']), step=jnp.zeros((), jnp.int32))
      jitted = jax.jit(step_fn, donate_argnums=(0,))
    else:
      raise ValueError(f"train_step must be 'auto', 'trainer' or 'minimal', got {train_step!r}")
    state = jax.device_put(state, replicated)
    args: tuple = (state, batch_data, jax.device_put(key_step, replicated))
  else:
    train_step = None
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))
    args = (variables, images)
  del variables

  start, start_cpu = time.perf_counter(), time.process_time()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile(compiler_options)
  compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu

  if train:
    holder = {'state': args[0]}

    def call():
      holder['state'], out = compiled(holder['state'], *args[1:])
      return holder['state'], out
  else:
    def call():
      return compiled(*args)

  try:
    temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend implements the analysis.
    temp_bytes = None
  device = jax.devices()[0]
  info = {
      'mode': mode,
      'backbone': config.model.backbone,
      'output_stride': output_stride,
      'crop_size': list(crop),
      'batch': batch,
      'dtype': str(jnp.dtype(dtype)),
      'depthwise_impl': layers.resolve_depthwise_impl(config.model.get('depthwise_impl', 'auto')),
      'device': f'{device.platform}:{device.device_kind}',
      'device_count': jax.device_count(),
      'devices_used': int(mesh.devices.size),
      'train_step': train_step,
      'lower_s': lower_s,
      'compile_s': compile_s,
      'compile_cpu_s': compile_cpu_s,
      'compiled_temp_bytes': temp_bytes,
  }
  return Prepared(call, mode, batch, multiply_adds(config, crop, output_stride), dtype, info,
                  compiled)


def summarise(prepared: Prepared, times: Sequence[float], matmul: dict) -> dict:
  """The result: `prepared.info`, step times, throughput, memory, FLOP/s against `matmul`."""
  median, fastest = statistics.median(times), min(times)
  memory, memory_source = peak_memory()
  images_per_s = prepared.batch / median
  train = prepared.mode == 'train'
  flops_per_s = 2.0 * prepared.multiply_adds * (3 if train else 1) * images_per_s
  result = {
      **prepared.info,
      'steps': len(times),
      'step_time_median_s': median,
      'step_time_min_s': fastest,
      'images_per_s': images_per_s,
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
      'multiply_adds': prepared.multiply_adds,
      'flops_per_s': flops_per_s,
      'flops_convention': ('train: 2 * multiply_adds * 3 (forward + backward = 3 forward passes) '
                           'per image' if train else 'infer: 2 * multiply_adds per image'),
      'matmul_size': matmul['size'],
      'matmul_flops_per_s': matmul['median'],
      'matmul_flops_per_s_max': matmul['max'],
      'peak_fraction': flops_per_s / matmul['median'],
      'load_average': list(os.getloadavg()),
  }
  if not all(math.isfinite(v) for v in result.values() if isinstance(v, float)):
    raise FloatingPointError(f'non-finite benchmark result: {result}')
  return result


def run(config: ml_collections.ConfigDict, mode: str = 'infer', batch: int | None = None,
        steps: int = 10, warmup: int = 1, matmul_size: int = 2048,
        train_step: str = 'auto') -> dict:
  """Benchmark `config`'s model in `mode` ('train' | 'infer'); returns the JSON-able results.

  Each timed step is followed by a timed reference matmul, so that on a shared machine both see
  the same load and `peak_fraction` compares like with like.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  prepared = prepare(config, mode, batch, train_step)
  matmul, work = matmul_reference(matmul_size, prepared.dtype)
  for _ in range(warmup):
    jax.block_until_ready(prepared.call())
  times, matmul_times = [], []
  for _ in range(steps):
    times.append(_timed(prepared.call))
    matmul_times.append(_timed(matmul))
  return summarise(prepared, times, {'size': matmul_size,
                                     'median': work / statistics.median(matmul_times),
                                     'max': work / min(matmul_times)})


def define_flags() -> None:
  """The command's flags; `--config` is shared with `deeplab_jax.flops`, which may define it first."""
  if 'config' not in flags.FLAGS:
    config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_enum('mode', 'infer', MODES, 'What to time: a train step or inference.')
  flags.DEFINE_integer('batch', None, 'Global batch; default train.batch_size / eval.batch_size.')
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
  flags.DEFINE_integer('matmul_size', 2048, 'Side of the reference square matmul.')
  flags.DEFINE_enum('train_step', 'auto', ('auto', 'trainer', 'minimal'),
                    "Train step: deeplab_jax.train's, the benchmark's minimal one, or 'auto'.")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  print(json.dumps(run(f.config, f.mode, f.batch, f.steps, f.warmup, f.matmul_size,
                       f.train_step)))


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)
