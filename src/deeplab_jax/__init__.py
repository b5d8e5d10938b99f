"""deeplab_jax: DeepLab v3+ (Chen et al., ECCV 2018) in JAX/Flax."""

__version__ = '0.1.0'
