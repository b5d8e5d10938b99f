"""The former home of the base config, kept so that config files written against it still load:
`from deeplab_jax.defaults import get_base_config` is `deeplab_jax.config.get_base_config`."""

from deeplab_jax.config import get_base_config

__all__ = ['get_base_config']
