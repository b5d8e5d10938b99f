"""DeepLab v3+ networks: `build_model(config.model)` turns a config into a Flax module."""

from deeplab_jax.models.backbones import BACKBONES, backbone_scope, build_backbone
from deeplab_jax.models.deeplab import DeepLab
from deeplab_jax.models.factory import (
    DTYPES,
    OUTPUT_STRIDES,
    atrous_rates,
    build_model,
    default_atrous_rates,
    variable_shapes,
)
from deeplab_jax.models.preprocessing import mean_pixel, preprocess
from deeplab_jax.models.scopes import Features

__all__ = ['BACKBONES', 'DTYPES', 'DeepLab', 'Features', 'OUTPUT_STRIDES', 'atrous_rates',
           'backbone_scope', 'build_backbone', 'build_model', 'default_atrous_rates', 'mean_pixel',
           'preprocess', 'variable_shapes']
