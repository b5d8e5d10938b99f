#!/usr/bin/env python3
"""Run a multi-process JAX job on this one machine: N processes, each with its own CPU devices.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
      --config=configs/shapes.py --workdir=/tmp/wd_2x2 [--config.train.num_steps=10 ...]

Everything after `--` goes to every process of `python -m deeplab_jax.main` (`--module` picks
another entry point). Each process gets `XLA_FLAGS=--xla_force_host_platform_device_count=D`,
`JAX_PLATFORMS=cpu` and `DEEPLAB_COORDINATOR_ADDRESS` / `DEEPLAB_NUM_PROCESSES` /
`DEEPLAB_PROCESS_ID` for `deeplab_jax.distributed.initialize` (coordinator on a free localhost
port), and, unless set already, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (huge pages for XLA:CPU's
per-step scratch memory: fewer page faults, README "Performance"), so the job sees N x D devices
in N processes, as a multi-host pod would, with gloo CPU collectives. Use it to check multi-host behaviour (per-process data shards, checkpoints, metrics)
without a pod. Prepare the dataset first (a multi-process job never builds one), e.g.
`python -c "from deeplab_jax.datasets import shapes; shapes.ensure_prepared(None)"`.

Output: each line prefixed with `[pI]`, or one `process_I.log` per process with `--log_dir`. The
launcher waits for all processes; when one fails it stops the others and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

ENV_COORDINATOR_ADDRESS = 'DEEPLAB_COORDINATOR_ADDRESS'  # As in deeplab_jax.distributed (not
ENV_NUM_PROCESSES = 'DEEPLAB_NUM_PROCESSES'  # imported: the launcher needs neither JAX nor the
ENV_PROCESS_ID = 'DEEPLAB_PROCESS_ID'  # package to be importable from its own interpreter).
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def free_port(host: str = '127.0.0.1') -> int:
  """A TCP port nobody listens on right now (bind to port 0 and let the OS choose)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return int(s.getsockname()[1])


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, coordinator: str,
                devices_per_process: int | None) -> dict[str, str]:
  """The environment of process `process_id`: distributed settings and forced CPU devices."""
  env = dict(base)
  env[ENV_COORDINATOR_ADDRESS] = coordinator
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  if devices_per_process:
    xla_flags = re.sub(rf'{_DEVICE_COUNT_FLAG}=\S*', '', env.get('XLA_FLAGS', '')).split()
    env['XLA_FLAGS'] = ' '.join([*xla_flags, f'{_DEVICE_COUNT_FLAG}={devices_per_process}'])
    env['JAX_PLATFORMS'] = 'cpu'
    env['CUDA_VISIBLE_DEVICES'] = ''
    env.setdefault('GLIBC_TUNABLES', HUGE_PAGES_TUNABLE)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.setdefault('PYTHONUNBUFFERED', '1')
  return env


def _pump(stream: IO[bytes], prefix: str, sink: IO[str], lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b''):
    line = raw.decode(errors='replace').rstrip('\n')
    with lock:
      sink.write(f'{prefix}{line}\n')
      sink.flush()
  stream.close()


def _stop(processes: Sequence[subprocess.Popen], grace_s: float = 30.0) -> None:
  """SIGTERM the processes still running (training checkpoints and exits), then SIGKILL whatever
  is left after `grace_s` (e.g. a process waiting for a dead peer)."""
  for p in processes:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in processes:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(args: Sequence[str], *, num_processes: int, devices_per_process: int | None = None,
           module: str = 'deeplab_jax.main', python: str = sys.executable, port: int = 0,
           log_dir: str | None = None, timeout_s: float | None = None,
           cwd: str | None = None, env: dict[str, str] | None = None) -> int:
  """Start `python -m module *args` as `num_processes` processes and wait for them.

  Returns 0 when all succeed, else the first failure's exit status (the other processes are
  stopped: they would wait forever for the failed one in the next collective). `timeout_s` stops
  everything after that long and returns 124.
  """
  if num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be at least 1.')
  coordinator = f'127.0.0.1:{port or free_port()}'
  base = dict(os.environ if env is None else env)
  lock = threading.Lock()
  processes: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  logs: list[IO[bytes]] = []
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  try:
    for i in range(num_processes):
      penv = process_env(base, process_id=i, num_processes=num_processes, coordinator=coordinator,
                         devices_per_process=devices_per_process)
      command = [python, '-m', module, *args]
      if log_dir:
        log = open(os.path.join(log_dir, f'process_{i}.log'), 'wb')  # noqa: SIM115 (closed below)
        logs.append(log)
        processes.append(subprocess.Popen(command, env=penv, cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT))
      else:
        p = subprocess.Popen(command, env=penv, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        processes.append(p)
        pump = threading.Thread(target=_pump, args=(p.stdout, f'[p{i}] ', sys.stdout, lock),
                                daemon=True)
        pump.start()
        pumps.append(pump)
    _say(f'{num_processes} process(es) x {devices_per_process or "all local"} device(s), '
         f'coordinator {coordinator}: {" ".join(command[1:])}')
    status = _wait(processes, timeout_s)
  except BaseException:  # KeyboardInterrupt included: never leave orphans behind.
    _stop(processes)
    raise
  finally:
    for pump in pumps:
      pump.join(timeout=5)
    for log in logs:
      log.close()
  if status:
    _say(f'failed with exit status {status}' + (f'; logs in {log_dir}' if log_dir else ''))
  return status


def _wait(processes: Sequence[subprocess.Popen], timeout_s: float | None) -> int:
  """Poll until all exit (0) or one fails (its status; the rest are stopped)."""
  start = time.monotonic()
  while True:
    codes = [p.poll() for p in processes]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i, code = failed[0]
      _say(f'process {i} exited with status {code}; stopping the others.')
      _stop(processes)
      return code if code > 0 else 128 - code  # A signal -N reads as 128 + N, as in a shell.
    if all(c == 0 for c in codes):
      return 0
    if timeout_s is not None and time.monotonic() - start > timeout_s:
      _say(f'timed out after {timeout_s:.0f} s; stopping all processes.')
      _stop(processes)
      return 124
    time.sleep(0.2)


def _say(message: str) -> None:
  print(f'[local_multiprocess] {message}', file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough: list[str] = []
  if '--' in argv:
    split = argv.index('--')
    argv, passthrough = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(
      description='Run N JAX processes on this machine (arguments after -- go to each process).')
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=2,
                      help='Forced CPU devices per process; 0 keeps the real devices.')
  parser.add_argument('--module', default='deeplab_jax.main', help='python -m MODULE to run.')
  parser.add_argument('--python', default=sys.executable, help='Interpreter for the processes.')
  parser.add_argument('--port', type=int, default=0, help='Coordinator port; 0 picks a free one.')
  parser.add_argument('--log_dir', default=None,
                      help='Write process_I.log files here instead of prefixed lines to stdout.')
  parser.add_argument('--timeout_s', type=float, default=None, help='Stop everything after this.')
  options = parser.parse_args(argv)
  # `kill LAUNCHER` stops the job too: SystemExit unwinds through launch(), which stops them.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  return launch(passthrough, num_processes=options.num_processes,
                devices_per_process=options.devices_per_process or None, module=options.module,
                python=options.python, port=options.port, log_dir=options.log_dir,
                timeout_s=options.timeout_s)


if __name__ == '__main__':
  sys.exit(main())
