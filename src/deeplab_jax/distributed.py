"""Multi-process (multi-host) start-up: one call to `jax.distributed.initialize`, or none.

Every process of a multi-host job (a Cloud TPU pod slice, SLURM tasks on GPU nodes, or N processes
on one machine) runs the same program and calls `initialize()` before anything touches a device.
Where the process layout comes from, first match wins:

1. arguments (the programs' `--coordinator_address`, `--num_processes`, `--process_id`);
2. environment variables `DEEPLAB_COORDINATOR_ADDRESS`, `DEEPLAB_NUM_PROCESSES`,
   `DEEPLAB_PROCESS_ID` (what `launch/local_multiprocess.py` sets);
3. the cluster: on a Cloud TPU pod, under SLURM `srun` or Open MPI, plain
   `jax.distributed.initialize()` finds the coordinator, process count and id itself.

Without any of these (a laptop, a single-host TPU VM, Colab) it does nothing: a single process.
After it, `jax.devices()` lists the devices of all processes, `jax.local_devices()` this process's.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
from absl import flags, logging

ENV_COORDINATOR_ADDRESS = 'DEEPLAB_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'DEEPLAB_NUM_PROCESSES'
ENV_PROCESS_ID = 'DEEPLAB_PROCESS_ID'
_BARRIER_COUNT = itertools.count()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'Environment variable {name}={value!r} must be an integer.') from None


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # Private API moved: assume not (the common case).
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Join the multi-process job described by the arguments, env vars or cluster (see module doc).

  Returns True when JAX now runs distributed (also when it already did: a second call is a no-op),
  False for a single process. Call it before the first use of a device.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if num_processes == 1 and process_id in (None, 0):
      return False
    missing = [name for name, v in zip(('coordinator_address', 'num_processes', 'process_id'),
                                       explicit, strict=True) if v is None]
    if missing:
      raise ValueError(
          f'A multi-process job needs --coordinator_address, --num_processes and --process_id '
          f'(or {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: '
          f'{", ".join(missing)}. On Cloud TPU pods and under SLURM srun leave all three unset.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id={process_id} must be in [0, num_processes={num_processes}).')
    logging.info('jax.distributed.initialize(%s, num_processes=%d, process_id=%d)',
                 coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True

  if _backends_initialized():  # e.g. a notebook that has used JAX already: nothing to join.
    logging.info('JAX devices are initialised already; not starting jax.distributed.')
    return False
  # Cluster auto-detection (Cloud TPU, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...). Detection is
  # cheap off-cluster (environment variables, no network); when nothing is found JAX stops with
  # "coordinator_address should be defined" before starting anything: a single process.
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if 'coordinator_address' not in str(e):
      raise
    return False
  logging.info('jax.distributed initialised from the cluster: process %d of %d.',
               jax.process_index(), jax.process_count())
  return True


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Wait until every process of the job has reached `barrier(name)` (a barrier of JAX's
  coordination service, no device collective); returns at once in a single process. Every process
  must call the same barriers in the same order (a counter makes each id new)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # The client has no public accessor.
  barrier_id = f'{name}/{next(_BARRIER_COUNT)}'
  jax_distributed.global_state.client.wait_at_barrier(barrier_id, timeout_in_ms=timeout_s * 1000)


def compile_together(jitted: Any, *args: Any, name: str) -> Any:
  """`jitted` compiled for `args`; in a multi-process job every process then waits at barrier
  `name` until all have compiled, and the compiled program is returned (a single process gets
  `jitted` back, which compiles at its first call as usual).

  The first collective of a program must not start while another process still compiles it:
  gloo's CPU collectives give up connecting after 30 s, and two processes compiling the same
  train step on shared cores can finish that far apart.
  """
  if jax.process_count() == 1:
    return jitted
  compiled = jitted.lower(*args).compile()
  barrier(name)
  return compiled


# --------------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Define `--coordinator_address`, `--num_processes`, `--process_id` (once; idempotent)."""
  if 'coordinator_address' in flag_values:
    return
  flags.DEFINE_string(
      'coordinator_address', None,
      f'host:port of process 0 for a multi-process job (or ${ENV_COORDINATOR_ADDRESS}). Leave '
      'unset on Cloud TPU pods and under SLURM: they are detected.', flag_values=flag_values)
  flags.DEFINE_integer('num_processes', None,
                       f'Number of processes of the job (or ${ENV_NUM_PROCESSES}).',
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer('process_id', None,
                       f'This process\'s index in [0, num_processes) (or ${ENV_PROCESS_ID}).',
                       lower_bound=0, flag_values=flag_values)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """`initialize` with the values of the flags of `define_flags` (unset ones: env / cluster)."""
  return initialize(flag_values.coordinator_address, flag_values.num_processes,
                    flag_values.process_id)
