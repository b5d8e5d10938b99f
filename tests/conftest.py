"""Test settings: 4 forced CPU devices (set before JAX is imported) so sharding tests run anywhere."""

import os
import sys

# torch._dynamo imports triton (GPU-only, unused here), whose bundled LLVM crashes the process when
# TensorFlow's is already loaded; keep it out so the timm/torch tests can run after TF tests.
sys.modules.setdefault('triton', None)
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def reference_dir() -> pathlib.Path:
  """`shared/reference/` beside the checkout (CI clones the repo with shared/ next to it)."""
  here = pathlib.Path(__file__).resolve()
  for candidate in (here.parents[2] / 'shared' / 'reference', here.parents[1] / 'shared' / 'reference'):
    if candidate.is_dir():
      return candidate
  pytest.skip('shared/reference/ (official TF variable names) is not beside this checkout')
