"""Test settings: 4 forced CPU devices (set before JAX is imported) so sharding tests run anywhere,
and, under pytest-xdist (`-n 2`), tests marked `exclusive` run with no other test beside them.
"""

import fcntl
import os
import sys
import tempfile

import pytest

# torch._dynamo imports triton (GPU-only, unused here), whose bundled LLVM crashes the process when
# TensorFlow's is already loaded; keep it out so the timm/torch tests can run after TF tests.
sys.modules.setdefault('triton', None)
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
  """Under xdist, each test's setup, call and teardown hold a lock shared by the run's workers:
  exclusively for tests marked `exclusive`, shared for the others.

  The exclusive ones start multi-process JAX jobs: their processes poll gloo's CPU collectives, and
  beside another test's compile on a 2-core machine such a job can stall for minutes.
  """
  run = os.environ.get('PYTEST_XDIST_TESTRUNUID')
  if run is None:  # One process runs everything: nothing to exclude.
    return (yield)
  mode = fcntl.LOCK_EX if item.get_closest_marker('exclusive') else fcntl.LOCK_SH
  path = os.path.join(tempfile.gettempdir(), f'deeplab_jax_tests_{run}.lock')
  with open(path, 'a') as f:  # Closing it releases the lock.
    fcntl.flock(f, mode)
    return (yield)
