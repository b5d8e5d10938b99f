"""Time a model's train step or inference: `python -m deeplab_jax.tools.benchmark --config=CONFIG`.

    python -m deeplab_jax.tools.benchmark --config=configs/voc_xception.py --mode=infer --batch=1
    python -m deeplab_jax.tools.benchmark --config=configs/voc_xception.py --mode=train --batch=4 \
        --steps=5 --config.model.depthwise_impl=grouped

Runs on random data at the config's crop (`train.crop_size` for `--mode=train`, `eval.crop_size` for
`--mode=infer`; one forward pass at scale 1, no flip) and prints one JSON object:
- `compile_s`: lowering plus XLA compilation of the jitted step;
- `step_time_median_s`, `step_time_min_s`: over `--steps` timed steps after `--warmup` untimed ones,
  each waited for with `block_until_ready`; `images_per_s` from the median;
- `peak_memory_bytes`: the device's `memory_stats()` peak where the backend has one, else the
  process's peak resident set size (`peak_memory_source` says which);
- `multiply_adds`: per image, one forward pass, from `deeplab_jax.multiply_adds`;
- `flops_per_s`: 2 * multiply_adds * images_per_s, times 3 in train mode (forward plus backward
  counted as three forward passes; `flops_convention` says so);
- `matmul_flops_per_s`: a jitted square matmul of the model's dtype (`--matmul_size`), timed after
  each step so that both see the same machine load, and `peak_fraction` = `flops_per_s` /
  `matmul_flops_per_s` (both from median times);
- `compiled_temp_bytes`: the step's scratch memory (activations kept for the backward pass, ...) as
  XLA planned it (`memory_analysis()`), where the backend reports it;
- `step_system_cpu_s_median`, `step_minor_faults_median`: the kernel's share of a timed step, in
  system CPU seconds and minor page faults of this process (XLA:CPU maps a step's scratch memory
  fresh for every step, so its pages fault in again each time: see docs/performance.md);
- `compile_cpu_s`: the compile's process CPU time, a steadier figure than `compile_s` on a busy
  machine; `load_average`: the machine's load at the end;
- `op_time_s`, `op_fractions`, `op_time_total_s`, `top_ops` (unless `--op_breakdown=false`): where
  the time goes, by op class (matmul, depthwise, batchnorm, copy, other), from one more step run
  under the profiler (`deeplab_jax.op_profile`: each instruction's recorded duration, summed by class);
- with `--matmul_floor`: `matmul_flops` (the FLOPs of the compiled program's dots and dense
  convolutions in one step, per device where the step is sharded), `matmul_floor_s` (each distinct
  one of them timed alone, jitted, times how often the step runs it: how long the step's matmul
  arithmetic takes at the rates XLA reaches on those shapes when nothing else runs; in the step
  they can run faster, operands still in cache), `matmul_floor_flops_per_s`, `dense_op_count` and
  `slowest_dense_ops`.

`--fold_batch_norm` times inference with every BatchNorm folded into its conv
(`layers.fold_batch_norm`; the same variables, outputs equal up to float rounding).

The train step is the one training runs (`train_state.make_train_step`, with its optimizer).
Variables are random (`synthetic_variables`), not `model.init`'s. A batch divisible by the device
count is sharded over all devices (`devices_used`), else it runs on one.
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
from absl import flags

from deeplab_jax import models, multiply_adds, op_profile, optim, sharding, train_state
from deeplab_jax.config import eval_output_stride
from deeplab_jax.datasets.spec import IGNORE_LABEL
from deeplab_jax.errors import ConfigError
from deeplab_jax.models import layers
from deeplab_jax.tools import app

MODES = ('train', 'infer')


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _kernel_share(fn: Callable[[], Any]) -> tuple[float, float, int]:
  """(wall s, system CPU s, minor page faults) of one blocking call of `fn`, for this process."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  seconds = _timed(fn)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return seconds, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt


def matmul_reference(size: int = 2048, dtype: Any = jnp.float32) -> tuple[Callable[[], Any], float]:
  """(call, flops): a compiled, warmed-up `size`^3 matmul of `dtype` and its FLOP count."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), dtype)
  b = jax.random.normal(key_b, (size, size), dtype)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  return lambda: matmul(a, b), 2.0 * size**3


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


def forward_multiply_adds(config: ml_collections.ConfigDict, crop: Sequence[int],
                          output_stride: int) -> int:
  """Multiply-adds of one forward pass of one image at `crop` and `output_stride`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.output_stride = output_stride
  config.eval.scales = (1.0,)
  config.eval.flip = False
  return int(multiply_adds.count(config, crop_size=tuple(crop))['multiply_adds'])


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


def _mesh(batch: int) -> jax.sharding.Mesh:
  """A ('data',) mesh over all devices if `batch` splits evenly over them, else over one."""
  n = jax.device_count() if batch % jax.device_count() == 0 else 1
  return sharding.create_mesh(jax.devices()[:n])


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
            compiler_options: dict[str, Any] | None = None,
            fold_batch_norm: bool = False) -> Prepared:
  """Build, lower and compile `config`'s train step or inference on random data.

  `compiler_options`: XLA debug options for this compile only (e.g.
  {'xla_cpu_enable_fast_math': True}). `fold_batch_norm`: inference with every BatchNorm folded
  into its conv (`layers.fold_batch_norm`).
  """
  if mode not in MODES:
    raise ConfigError(f'--mode must be one of {MODES}, got {mode!r}')
  train = mode == 'train'
  if train and fold_batch_norm:
    raise ConfigError('--fold_batch_norm is for --mode=infer: training needs the batch statistics.')
  batch = int(batch or (config.train.batch_size if train else config.eval.batch_size))
  crop = tuple(int(s) for s in (config.train.crop_size if train else config.eval.crop_size))
  output_stride = config.model.output_stride if train else eval_output_stride(config)
  model = models.build_model(config.model, output_stride, fold_batch_norm=fold_batch_norm)
  dtype = models.DTYPES[config.model.dtype]
  mesh = _mesh(batch)
  data_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

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
    tx = optim.create_optimizer(config, variables['params'])
    state = train_state.create_train_state(variables, tx, mesh)
    jitted = train_state.make_train_step(config, model, tx, mesh)
    args: tuple = (state, batch_data, jax.device_put(key_step, replicated))
  else:
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
      'depthwise_impl': layers.resolve_depthwise_impl(config.model.depthwise_impl),
      'fold_batch_norm': fold_batch_norm,
      'device': f'{device.platform}:{device.device_kind}',
      'device_count': jax.device_count(),
      'devices_used': int(mesh.devices.size),
      'lower_s': lower_s,
      'compile_s': compile_s,
      'compile_cpu_s': compile_cpu_s,
      'compiled_temp_bytes': temp_bytes,
  }
  return Prepared(call, mode, batch, forward_multiply_adds(config, crop, output_stride), dtype, info,
                  compiled)


def summarise(prepared: Prepared, times: Sequence[float], matmul: dict,
              system_s: Sequence[float], faults: Sequence[int]) -> dict:
  """The result: `prepared.info`, step times, throughput, memory, FLOP/s against `matmul`, and
  each step's system CPU seconds and minor page faults (`_kernel_share`)."""
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
      'step_system_cpu_s_median': statistics.median(system_s),
      'step_minor_faults_median': int(statistics.median(faults)),
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


def benchmark(config: ml_collections.ConfigDict, mode: str = 'infer', batch: int | None = None,
              steps: int = 10, warmup: int = 1, matmul_size: int = 2048,
              op_breakdown: bool = True, fold_batch_norm: bool = False,
              matmul_floor: bool = False) -> dict:
  """Benchmark `config`'s model in `mode` ('train' | 'infer'); returns the JSON-able results.

  Each timed step is followed by a timed reference matmul, so that on a shared machine both see
  the same load and `peak_fraction` compares like with like.
  """
  if steps < 1:
    raise ConfigError(f'--steps must be >= 1, got {steps}')
  prepared = prepare(config, mode, batch, fold_batch_norm=fold_batch_norm)
  hlo_text = prepared.compiled.as_text() if matmul_floor else ''
  matmul, work = matmul_reference(matmul_size, prepared.dtype)
  for _ in range(warmup):
    jax.block_until_ready(prepared.call())
  times, matmul_times, system_s, faults = [], [], [], []
  for _ in range(steps):
    seconds, system, minor_faults = _kernel_share(prepared.call)
    times.append(seconds)
    system_s.append(system)
    faults.append(minor_faults)
    matmul_times.append(_timed(matmul))
  result = summarise(prepared, times, {'size': matmul_size,
                                       'median': work / statistics.median(matmul_times),
                                       'max': work / min(matmul_times)}, system_s, faults)
  if op_breakdown:
    result.update(op_profile.breakdown(prepared.compiled, prepared.call))
  if matmul_floor:
    del prepared  # Frees the step's state before the floor's own operands are made.
    result.update(op_profile.matmul_floor(op_profile.dense_ops(hlo_text)))
  return result


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = flag_values
  app.define_config_flag(fv)
  flags.DEFINE_enum('mode', 'infer', MODES, 'What to time: a train step or inference.',
                    flag_values=fv)
  flags.DEFINE_integer('batch', None, 'Global batch; default train.batch_size / eval.batch_size.',
                       flag_values=fv)
  flags.DEFINE_integer('steps', 10, 'Timed steps.', flag_values=fv)
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.', flag_values=fv)
  flags.DEFINE_integer('matmul_size', 2048, 'Side of the reference square matmul.', flag_values=fv)
  flags.DEFINE_bool('fold_batch_norm', False, 'Inference with BatchNorm folded into the convs.',
                    flag_values=fv)
  flags.DEFINE_bool('op_breakdown', True, 'Also profile one step and print the per-op-class time.',
                    flag_values=fv)
  flags.DEFINE_bool('matmul_floor', False, 'Also time every matmul of the step alone and print '
                    'their sum (about a minute for a full-size train step).', flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> dict:
  app.no_arguments(argv)
  f = flag_values
  result = benchmark(f.config, f.mode, f.batch, f.steps, f.warmup, f.matmul_size, f.op_breakdown,
                     f.fold_batch_norm, f.matmul_floor)
  print(json.dumps(result))
  return result


run = app.runner(__name__)

if __name__ == '__main__':
  run()
