"""`python -m deeplab_jax.datasets.cityscapes`: the older spelling of
`python -m deeplab_jax.tools.build_dataset cityscapes`."""

import sys

from deeplab_jax.tools import build_dataset

sys.argv.insert(1, 'cityscapes')
build_dataset.run()
