"""Cityscapes (fine, 19 classes), DeepLab v3+ with Xception-65.

  python -m deeplab_jax.main --config=configs/cityscapes_xception.py --workdir=WORKDIR \\
      --config.init_from=PRETRAINED_WORKDIR

Recipe: output stride 16, separable ASPP and decoder, crop 769x769 (the paper's Cityscapes setting), batch 8 and 90k
steps at lr 0.01 poly (the official Cityscapes settings as we understand them; batch 16 if memory
allows), weight decay 4e-5, random scale 0.5..2.0 and flip; evaluation on whole 1024x2048 images
padded to 1025x2049.

Expected validation mIoU (official model zoo `xception65_cityscapes_trainfine`): 78.79%
at OS 16 single scale, 80.42% with OS 8, multi-scale inputs and flip. Needs the TFDS `cityscapes` dataset
(manual download, see `deeplab_jax.datasets.cityscapes`).

Reproduce (`config.eval.expected_miou` is this setting's 0.7879):
  python -m deeplab_jax.tools.reproduce --config=configs/cityscapes_xception.py --workdir=WORKDIR
  python -m deeplab_jax.tools.reproduce --config=configs/cityscapes_xception.py --workdir=WORKDIR \\
      --config.eval.output_stride=8 --config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)' --config.eval.flip=True --expect=0.8042
Sliding windows instead of whole images (no published figure; mmsegmentation's setting):
  --config.eval.mode=slide --config.eval.crop_size='(769,769)' (stride 513 by default).
"""

from deeplab_jax.config import get_base_config


def get_config():
  c = get_base_config()
  c.model.num_classes = 19
  c.data.dataset = 'cityscapes/semantic_segmentation'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.train.batch_size = 8
  c.train.crop_size = (769, 769)
  c.train.num_steps = 90_000
  c.optim.base_lr = 0.01
  c.eval.crop_size = (1025, 2049)
  c.eval.batch_size = 2
  c.eval.expected_miou = 0.7879  # Model zoo xception65_cityscapes_trainfine, OS 16, single scale.
  return c
