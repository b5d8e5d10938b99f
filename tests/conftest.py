"""Test settings: 4 forced CPU devices (set before JAX is imported) so sharding tests run anywhere."""

import os
import sys

# torch._dynamo imports triton (GPU-only, unused here), whose bundled LLVM crashes the process when
# TensorFlow's is already loaded; keep it out so the timm/torch tests can run after TF tests.
sys.modules.setdefault('triton', None)
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


