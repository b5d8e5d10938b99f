"""`python -m deeplab_jax.predict`: the older spelling of `python -m deeplab_jax.tools.predict`."""

if __name__ == '__main__':
  from deeplab_jax.tools.predict import run

  run()
