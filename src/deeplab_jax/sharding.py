"""Data parallelism over a 1-D device mesh: the batch is split over `data`, everything else replicated.

A jitted step whose batch is sharded this way computes BatchNorm statistics over the *global* batch
(the model's BatchNorm reduces over N, H, W and XLA inserts the cross-device reduction): synchronised
BatchNorm without an `axis_name`. The mesh uses `AxisType.Auto` so that XLA propagates shardings
through reshapes, top-k and resizes instead of asking for explicit annotations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def check_batch_size(global_batch: int, mesh: Mesh, field: str = 'config.train.batch_size') -> None:
  """The global batch must split evenly over devices and processes; say which field to change."""
  devices = mesh.devices.size
  processes = jax.process_count()
  if global_batch <= 0 or global_batch % devices or global_batch % processes:
    raise ValueError(
        f'{field}={global_batch} is the global batch over all {devices} devices '
        f'({processes} process(es)) and must be a positive multiple of {devices}; set it to e.g. '
        f'{max(devices, (global_batch // devices) * devices or devices)}.')


def local_batch_size(global_batch: int) -> int:
  """This process's share of a global batch."""
  return global_batch // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Put every leaf of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble global arrays sharded over the batch axis from this process's rows."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
