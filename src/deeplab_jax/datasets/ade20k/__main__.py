"""`python -m deeplab_jax.datasets.ade20k`: the older spelling of
`python -m deeplab_jax.tools.build_dataset ade20k`."""

import sys

from deeplab_jax.tools import build_dataset

sys.argv.insert(1, 'ade20k')
build_dataset.run()
