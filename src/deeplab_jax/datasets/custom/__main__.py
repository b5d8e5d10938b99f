"""`python -m deeplab_jax.datasets.custom check|build ...`: the older spelling of
`python -m deeplab_jax.tools.check_dataset ...` and `python -m deeplab_jax.tools.build_dataset
custom ...`."""

import sys

from deeplab_jax.tools import build_dataset, check_dataset

command = sys.argv.pop(1) if len(sys.argv) > 1 else ''
if command == 'check':
  check_dataset.run()
elif command == 'build':
  sys.argv.insert(1, 'custom')
  build_dataset.run()
else:
  sys.exit('usage: python -m deeplab_jax.datasets.custom {check,build} --root=ROOT ...')
