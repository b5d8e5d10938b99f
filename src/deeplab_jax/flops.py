"""`python -m deeplab_jax.flops`: the older spelling of `python -m deeplab_jax.tools.flops`."""

if __name__ == '__main__':
  from deeplab_jax.tools.flops import run

  run()
