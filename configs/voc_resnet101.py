"""PASCAL VOC 2012, DeepLab v3+ with ResNet-101 (`resnet_v1_101_beta`, multi-grid 1,2,4).

  python -m deeplab_jax.main --config=configs/voc_resnet101.py --workdir=WORKDIR \\
      --config.init_from=PRETRAINED_WORKDIR

Recipe as the paper's ResNet-101 decoder study: output stride 16, dense (not separable) ASPP and
decoder convs, 48-channel low-level projection, decoder [3x3, 256] x 2, crop 513, batch 16, 30k
steps, lr 0.007 poly, weight decay 1e-4 (ResNet), random scale 0.5..2.0 and flip.

Expected validation mIoU (paper Table 3, ImageNet-pretrained `resnet_v1_101_beta`): 78.85% at
OS 16 single scale; 80.57% with `--config.eval.output_stride=8`, scales 0.5..1.75 and flip.
PRETRAINED_WORKDIR: `python -m deeplab_jax.convert tf --checkpoint=.../resnet_v1_101/model.ckpt
--config=configs/voc_resnet101.py --output=PRETRAINED_WORKDIR`.

Reproduce (`config.eval.expected_miou` is this setting's 0.7885):
  python -m deeplab_jax.tools.reproduce --config=configs/voc_resnet101.py --workdir=WORKDIR
  python -m deeplab_jax.tools.reproduce --config=configs/voc_resnet101.py --workdir=WORKDIR \\
      --config.eval.output_stride=8 --config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)' --config.eval.flip=True --expect=0.8057
"""

from deeplab_jax.config import get_base_config


def get_config():
  c = get_base_config()
  c.model.backbone = 'resnet_v1_101_beta'
  c.model.multi_grid = (1, 2, 4)
  c.model.aspp_separable = False
  c.model.decoder_separable = False
  c.optim.weight_decay = 1e-4
  c.eval.expected_miou = 0.7885  # Paper Table 3: decoder, OS 16, single scale.
  return c
