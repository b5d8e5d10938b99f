"""`python -m deeplab_jax.benchmark`: the older spelling of `python -m deeplab_jax.tools.benchmark`."""

if __name__ == '__main__':
  from deeplab_jax.tools.benchmark import run

  run()
