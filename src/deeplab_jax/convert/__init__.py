"""Pretrained weights into deeplab_jax checkpoints: official TF1 DeepLab checkpoints and timm weights.

    python -m deeplab_jax.tools.convert tf --checkpoint=DIR/model.ckpt --config=configs/X.py \\
        --output=OUT
    python -m deeplab_jax.tools.convert timm --model=xception65 --weights=FILE.safetensors \\
        --config=configs/X.py --output=OUT

One module per source: `convert.tf` (by variable name), `convert.timm` (renamed to the TF names
first); both end in the strict conversion of `convert.core`, and `convert.write` saves the result
with `checkpoint.save_variables`, so OUT serves as `--workdir` for evaluation and prediction and as
`config.init_from`.
"""

from deeplab_jax.convert.core import (
    Report,
    Source,
    convert,
    initial_values,
    model_variables,
    write,
)
from deeplab_jax.convert.tf import convert_tf, parse_slice, select_logits_classes, tf_source
from deeplab_jax.errors import ConversionError

__all__ = ['ConversionError', 'Report', 'Source', 'convert', 'convert_tf', 'initial_values',
           'model_variables', 'parse_slice', 'select_logits_classes', 'tf_source', 'write']
