"""`python -m deeplab_jax.soak`: the older spelling of `python -m deeplab_jax.tools.soak`."""

if __name__ == '__main__':
  from deeplab_jax.tools.soak import run

  run()
