"""Host memory over a training run: train many steps and check that memory stays flat.

  python -m deeplab_jax.tools.soak --steps=1000 [--config=configs/shapes.py --config.x=...] \
      [--every=50]

Runs `train.train_and_evaluate` (logging, checkpointing, periodic evaluation and the tf.data input
pipeline all included) and samples this process's resident anonymous memory (`anon_rss_mb`) as the
loop asks for each `--every`-th batch. Prints one JSON line: the samples, and the Theil-Sen slope (the
median of the pairwise slopes: samples scatter by tens of MB as tf.data's buffers and the allocator's
arenas fill and drain, and a few outliers would swing a least-squares fit) over the steps after warm-up (`slope_mb_per_100_steps`; the first `--warmup` fraction of the run is
compilation and cache filling, not a leak). Without `--config` it trains the tiny model of
`configs/tiny.py` (`config.tiny_config`) on `deeplab_shapes/tiny` (built on first use under
`--data_dir`), checkpointing every 50 steps and evaluating every 100; to change its fields, pass
`--config=configs/tiny.py --config.x=...`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
from absl import flags

from deeplab_jax import config as config_lib
from deeplab_jax import input_pipeline, train, train_state
from deeplab_jax.tools import app


def soak_config(steps: int, data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The tiny config for `steps` steps, with frequent logs, checkpoints and evaluations."""
  c = config_lib.tiny_config(data_dir)
  c.train.num_steps = steps
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.eval.every = 100
  c.eval.num_images = 4
  c.eval.num_summary_images = 1
  return c


def anon_rss_mb() -> float:
  """This process's live anonymous memory (heap, arenas, anonymous maps) in MB.

  Garbage is collected and glibc's free pages are returned to the OS first: otherwise the allocator's
  free lists grow and shrink in a saw-tooth of hundreds of MB that hides (or fakes) a slow leak. Not
  the whole RSS either: that also counts pages of mapped files (the XLA and TensorFlow libraries),
  which the kernel drops under memory pressure and faults back in later. Linux only (/proc);
  elsewhere the peak RSS from getrusage.
  """
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc.
    pass
  try:
    with open('/proc/self/status') as f:
      fields = dict(line.split(':', 1) for line in f if ':' in line)
    return int(fields['RssAnon'].split()[0]) / 1024
  except (OSError, KeyError, ValueError):
    import resource  # noqa: PLC0415
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def slope_per_100_steps(samples: Sequence[tuple[int, float]]) -> float:
  """Theil-Sen slope of MB over steps (median of all pairwise slopes), per 100 steps; 0 with fewer
  than two distinct steps."""
  steps, mb = np.asarray(samples, np.float64).reshape(-1, 2).T
  i, j = np.triu_indices(len(steps), k=1)
  apart = steps[j] != steps[i]
  if not apart.any():
    return 0.0
  return float(np.median((mb[j] - mb[i])[apart] / (steps[j] - steps[i])[apart]) * 100)


def soak(config: ml_collections.ConfigDict, workdir: str | os.PathLike, every: int = 50,
         warmup: float = 0.2, run_eval: bool = True) -> tuple[dict, train_state.TrainState]:
  """Train `config` in `workdir`, sampling memory every `every` steps; returns (report, state)."""
  samples: list[tuple[int, float]] = []

  def sampled_iterator(config, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    step = kwargs.get('start_step', 0)
    for batch in input_pipeline.create_train_iterator(config, **kwargs):
      if step % every == 0:  # Before step + 1 runs: everything up to `step` is done.
        samples.append((step, anon_rss_mb()))
      yield batch
      step += 1

  start = time.perf_counter()
  state = train.train_and_evaluate(config, workdir, run_eval=run_eval,
                                   create_train_iterator=sampled_iterator)
  seconds = time.perf_counter() - start
  samples.append((int(config.train.num_steps), anon_rss_mb()))
  first = int(warmup * config.train.num_steps)
  steady = [s for s in samples if s[0] >= first]
  return {
    'steps': int(config.train.num_steps),
    'seconds': round(seconds, 1),
    'warmup_steps': first,
    'slope_mb_per_100_steps': round(slope_per_100_steps(steady), 3),
    'anon_rss_after_warmup_mb': round(steady[0][1], 1) if steady else None,
    'anon_rss_end_mb': round(samples[-1][1], 1),
    'anon_rss_max_mb': round(max(mb for _, mb in samples), 1),
    'samples': [[s, round(mb, 1)] for s, mb in samples],
  }, state


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = flag_values
  app.define_config_flag(fv, required=False, help='Config file (default: the tiny model of '
                         'configs/tiny.py); --config.train.num_steps is replaced by --steps.')
  flags.DEFINE_integer('steps', 1000, 'Training steps.', flag_values=fv)
  flags.DEFINE_integer('every', 50, 'Steps between memory samples.', flag_values=fv)
  flags.DEFINE_float('warmup', 0.2, 'Fraction of the steps left out of the slope.', flag_values=fv)
  app.define_workdir_flag(fv, required=False, help='Workdir (default: a fresh temporary '
                          'directory).')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir for the default config (default: a '
                      'temporary directory).', flag_values=fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> dict:
  app.no_arguments(argv)
  f = flag_values
  with tempfile.TemporaryDirectory(prefix='deeplab_soak_') as tmp:
    if f.config is not None:
      config = f.config
      config.train.num_steps = f.steps
    else:
      config = soak_config(f.steps, f.data_dir or os.path.join(tmp, 'tfds'))
    report, _ = soak(config, f.workdir or os.path.join(tmp, 'workdir'), f.every, f.warmup)
  print(json.dumps(report), flush=True)
  return report


run = app.runner(__name__)

if __name__ == '__main__':
  run()
