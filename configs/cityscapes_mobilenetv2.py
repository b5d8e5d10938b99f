"""Cityscapes (fine, 19 classes), DeepLab v3 with MobileNetV2: the model zoo's mobile model.

  python -m deeplab_jax.tools.convert tf --checkpoint=deeplabv3_mnv2_cityscapes_train/model.ckpt \\
      --config=configs/cityscapes_mobilenetv2.py --output=workdir/mnv2_cityscapes
  python -m deeplab_jax.main --mode=eval --config=configs/cityscapes_mobilenetv2.py \\
      --workdir=workdir/mnv2_cityscapes

The model-zoo head: image pooling and the 1x1 ASPP branch, no atrous branches
(`atrous_rates=()`) and no decoder; MobileNetV2 at output stride 16. Recipe as
`configs/cityscapes_xception.py`: crop 769x769, batch 8, 90k steps at lr 0.01 poly, weight decay
4e-5; evaluation on whole 1024x2048 images padded to 1025x2049.

Published validation mIoU (official model zoo `mobilenetv2_coco_cityscapes_trainfine`, 21.27B
multiply-adds): 70.71% at OS 16 single scale; 73.57% with `--config.eval.output_stride=8
--config.eval.scales='(0.75,1.0,1.25)' --config.eval.flip=True`. Needs the TFDS `cityscapes`
dataset (manual download, see `deeplab_jax.datasets.cityscapes`).
"""

from deeplab_jax.config import get_base_config


def get_config():
  c = get_base_config()
  c.model.backbone = 'mobilenet_v2'
  c.model.output_stride = 16
  c.model.atrous_rates = ()
  c.model.decoder = False
  c.model.num_classes = 19
  c.data.dataset = 'cityscapes/semantic_segmentation'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.train.batch_size = 8
  c.train.crop_size = (769, 769)
  c.train.num_steps = 90_000
  c.optim.base_lr = 0.01
  c.optim.weight_decay = 4e-5
  c.eval.crop_size = (1025, 2049)
  c.eval.batch_size = 2
  c.eval.expected_miou = 0.7071  # Model zoo mobilenetv2_coco_cityscapes_trainfine, OS 16.
  return c
