"""`python -m deeplab_jax.datasets.voc`: the older spelling of
`python -m deeplab_jax.tools.build_dataset voc`."""

import sys

from deeplab_jax.tools import build_dataset

sys.argv.insert(1, 'voc')
build_dataset.run()
