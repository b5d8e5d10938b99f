"""`python -m deeplab_jax.convert`: the older spelling of `python -m deeplab_jax.tools.convert`."""

from deeplab_jax.tools import app, convert

app.run(convert)
