"""Graceful stop on SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, checkpoint, exit 0.

`StopSignals` is a context manager for the training loop. A signal only sets a flag (a signal handler
must not touch devices or files); the loop asks `should_stop(step)` after every step and, when it says
so, saves a checkpoint of that step, waits until it is durable and returns. A second signal of the same
kind while stopping takes the default action (SIGINT: `KeyboardInterrupt`; SIGTERM: terminate), so a
stuck save can still be interrupted.

Multi-process jobs must stop at the same step on every process, or the next step's collectives hang:

- SIGTERM: `jax.distributed.initialize` starts JAX's preemption sync manager, which owns SIGTERM and
  propagates a notice from any process to all of them. `should_stop` asks
  `multihost_utils.reached_preemption_sync_point(step)` every step: a host-side call (no device sync)
  that is True on every process at the same step, the first after all have heard of the notice.
  `StopSignals` then leaves SIGTERM to it.
- SIGINT (and SIGTERM where the sync manager is off): the local flag is combined over processes with
  one tiny all-gather every `sync_every` steps (the loop's log interval, where it syncs anyway), so a
  Ctrl-C stops the job within one log interval.

A single process checks its flag every step at no cost.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_sync_manager_active() -> bool:
  """Whether JAX's multi-process preemption sync manager is running (it then owns SIGTERM)."""
  try:
    from jax._src import distributed  # noqa: PLC0415
  except ImportError:  # Private module moved: fall back to our own SIGTERM handling.
    return False
  state = distributed.global_state
  return state.client is not None and getattr(state, 'preemption_sync_manager', None) is not None


class StopSignals:
  """Turn SIGTERM / SIGINT into a stop request that `should_stop(step)` reports (see module doc).

  Use as `with StopSignals(sync_every=log_every) as stop: ... if stop.should_stop(step): ...`.
  Previous handlers are restored on exit. Outside the main thread signals cannot be caught and only
  the multi-process SIGTERM path works.
  """

  def __init__(self, sync_every: int = 1):
    self.sync_every = max(int(sync_every), 1)
    self.received: str | None = None  # Name of the first signal received.
    self.multiprocess = jax.process_count() > 1
    self._sync_manager = self.multiprocess and _preemption_sync_manager_active()
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: SIGTERM/SIGINT will not stop training gracefully.')
      return self
    for sig in SIGNALS:
      if sig == signal.SIGTERM and self._sync_manager:
        continue  # JAX's preemption notifier handles it.
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if self.received is not None:  # A second signal: the default action, now.
      signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.received = name
    # A raw write: `print` / logging from a handler that interrupted them can fail (reentrant I/O).
    os.write(2, f'{name} received: stopping after the current step with a checkpoint.\n'.encode())

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; the same answer on every process.

    Call it after every step, with the same step numbers on every process.
    """
    if not self.multiprocess:
      return self.received is not None
    if self._sync_manager and multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or 'SIGTERM'
      return True
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if np.any(flags):
      self.received = self.received or 'a signal on another process'
      return True
    return False
