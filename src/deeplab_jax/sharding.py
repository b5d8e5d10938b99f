"""Data parallelism over a 1-D device mesh: the batch is split over `data`, everything else replicated.

A jitted step whose batch is sharded this way computes BatchNorm statistics over the *global* batch
(the model's BatchNorm reduces over N, H, W and XLA inserts the cross-device reduction): synchronised
BatchNorm without an `axis_name`. The mesh uses `AxisType.Auto` so that XLA propagates shardings
through reshapes, top-k and resizes instead of asking for explicit annotations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deeplab_jax.errors import ConfigError

DATA_AXIS = 'data'


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data',) mesh over `devices` (default: every device of every process)."""
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (parameters, optimizer state, scalars)."""
  return NamedSharding(mesh, P())


def check_batch_size(field: str, batch: object, *, devices: int | None = None,
                     processes: int | None = None) -> None:
  """ConfigError unless global batch `field` splits evenly over the devices (None: not checked)
  and the processes (None: JAX's count)."""
  processes = jax.process_count() if processes is None else int(processes)
  step = math.lcm(processes, devices or 1)
  if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 and batch % step == 0:
    return
  where = (f'all {devices} devices ({processes} process(es))' if devices is not None
           else f'{processes} process(es)')
  suggestion = max(step, (batch // step) * step) if isinstance(batch, int) else step
  raise ConfigError(f'{field}={batch!r} is the global batch over {where} and must be a positive '
                    f'multiple of {step}; set it to e.g. {suggestion}, or run on a number of '
                    'devices and processes that divides it (a resumed run keeps its global batch).')


def local_batch_size(global_batch: int, field: str = 'config.train.batch_size',
                     processes: int | None = None) -> int:
  """This process's share of global batch `field` (ConfigError unless it splits evenly)."""
  processes = jax.process_count() if processes is None else int(processes)
  check_batch_size(field, global_batch, processes=processes)
  return global_batch // processes


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Put every leaf of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble global arrays sharded over the batch axis from this process's rows."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
