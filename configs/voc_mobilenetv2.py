"""PASCAL VOC 2012, DeepLab v3 with MobileNetV2: the official model zoo's mobile model.

  python -m deeplab_jax.tools.convert tf \\
      --checkpoint=deeplabv3_mnv2_pascal_train_aug/model.ckpt-30000 \\
      --config=configs/voc_mobilenetv2.py --output=workdir/mnv2_voc
  python -m deeplab_jax.main --mode=eval --config=configs/voc_mobilenetv2.py \\
      --workdir=workdir/mnv2_voc
  python -m deeplab_jax.main --config=configs/voc_mobilenetv2.py --workdir=WORKDIR \\
      --config.init_from=PRETRAINED_WORKDIR

The model-zoo head: image pooling and the 1x1 ASPP branch, no atrous branches
(`atrous_rates=()`) and no decoder; MobileNetV2 backbone at output stride 16 (depth multiplier
`model.width_multiplier`, 0.5 for the `dm05` checkpoints). Recipe as the other VOC configs: crop
513x513, batch 16 with BatchNorm fine-tuned, 30k steps, poly learning rate from 0.007, weight decay
4e-5, train on `train_aug`, evaluate on `validation` padded to 513x513.

Published validation mIoU (official model zoo, 2.75B multiply-adds at OS 16):
`mobilenetv2_coco_voc_trainaug` 75.32% (OS 16, single scale) and 77.33% (OS 8, scales 0.5..1.75 and
flip: `--config.eval.output_stride=8 --config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)'
--config.eval.flip=True`); `mobilenetv2_dm05_coco_voc_trainaug`
(`--config.model.width_multiplier=0.5`, 0.88B) 70.19%. PRETRAINED_WORKDIR: an ImageNet
`mobilenet_v2_1.0_224` checkpoint converted with `deeplab_jax.tools.convert tf` (it fills the
backbone; its classifier is skipped).
Needs the `voc2012_segmentation` dataset (see `deeplab_jax.datasets.voc`).
"""

from deeplab_jax.config import get_base_config


def get_config():
  c = get_base_config()  # The base config is the VOC recipe; only the network differs.
  c.model.backbone = 'mobilenet_v2'
  c.model.atrous_rates = ()  # The zoo head: no atrous ASPP branches.
  c.model.decoder = False
  c.eval.expected_miou = 0.7532  # Model zoo mobilenetv2_coco_voc_trainaug, OS 16, single scale.
  return c
