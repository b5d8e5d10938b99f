"""Count a model's multiply-adds: `python -m deeplab_jax.tools.flops --config=CONFIG [--config.x=y]`.

Prints one JSON object from `multiply_adds.count`: `multiply_adds` (the model's own conv and matmul
multiply-adds at the eval crop), `multiply_adds_tf` (as the paper's TF profiler counted them),
`params`, and the settings counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from deeplab_jax import multiply_adds
from deeplab_jax.tools import app


def define_flags(flag_values: flags.FlagValues) -> None:
  app.define_config_flag(flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> dict:
  app.no_arguments(argv)
  result = multiply_adds.count(flag_values.config)
  print(json.dumps(result))
  return result


run = app.runner(__name__)

if __name__ == '__main__':
  run()
