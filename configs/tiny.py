"""A tiny ResNet-50-beta DeepLab v3+ on `deeplab_shapes/tiny`: seconds on a CPU, for smoke tests and
measurements, not for accuracy.

  python -m deeplab_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m deeplab_jax.tools.soak --config=configs/tiny.py --steps=1000 --config.eval.every=100

Builds the 24 + 8 image dataset on first use (a few seconds), trains 6 steps of batch 4 at 33x33
and evaluates; the mIoU it reaches means nothing. The fields are `deeplab_jax.config.tiny_config`.
"""

from deeplab_jax.config import tiny_config


def get_config():
  return tiny_config()
