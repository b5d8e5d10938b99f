"""PASCAL VOC 2012, DeepLab v3+ with Xception-65: the paper's best single-scale VOC model.

  python -m deeplab_jax.main --config=configs/voc_xception.py --workdir=WORKDIR \\
      --config.init_from=PRETRAINED_WORKDIR

Recipe (official): output stride 16, separable ASPP and decoder ("SC"), crop 513x513, batch 16 with
BatchNorm fine-tuned (sync BN over all devices), 30k steps, SGD momentum 0.9, poly learning rate
from 0.007 (power 0.9), weight decay 4e-5, random scale 0.5..2.0 and flip; train on `train_aug`
(10,582 images), evaluate on `validation` (1,449) padded to 513x513.

Expected validation mIoU (paper / official model zoo): 82.20% starting from the COCO-pretrained
checkpoint, 79.93% (decoder, no SC) to ~80% from an ImageNet-pretrained Xception-65 (paper Table 5);
with `--config.eval.output_stride=8 --config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)'
--config.eval.flip=True`: 83.58% (COCO init). PRETRAINED_WORKDIR is the output of
`python -m deeplab_jax.convert tf --checkpoint=.../model.ckpt --config=configs/voc_xception.py
--output=PRETRAINED_WORKDIR` (the official `xception_65_coco_pretrained` or ImageNet `xception_65`
checkpoint); without init_from the model trains from scratch and lands far lower.
Needs the `voc2012_segmentation` dataset (see `deeplab_jax.datasets.voc`).

Reproduce (`config.eval.expected_miou` is this setting's 0.8220; the table shows ours vs published):
  python -m deeplab_jax.tools.reproduce --config=configs/voc_xception.py --workdir=workdir/x65_voc
  python -m deeplab_jax.tools.reproduce --config=configs/voc_xception.py --workdir=workdir/x65_voc \\
      --config.eval.output_stride=8 --config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)' --config.eval.flip=True --expect=0.8358
"""

from deeplab_jax.config import get_base_config


def get_config():
  c = get_base_config()  # The base config is this recipe; the lines below make it explicit.
  c.model.backbone = 'xception_65'
  c.model.output_stride = 16
  c.model.aspp_separable = True
  c.model.decoder_separable = True
  c.model.num_classes = 21
  c.data.dataset = 'voc2012_segmentation'
  c.data.train_split = 'train_aug'
  c.data.eval_split = 'validation'
  c.train.batch_size = 16
  c.train.crop_size = (513, 513)
  c.train.num_steps = 30_000
  c.optim.base_lr = 0.007
  c.optim.weight_decay = 4e-5
  c.eval.crop_size = (513, 513)
  c.eval.expected_miou = 0.8220  # Model zoo xception65_coco_voc_trainaug, OS 16, single scale.
  return c
