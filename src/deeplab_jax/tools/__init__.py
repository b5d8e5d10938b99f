"""The programs: each is a few lines of wiring from flags to the library, run by `tools.app`.

  main (deeplab_jax.main)  train and evaluate          check_dataset     check a folder dataset
  predict                  segment image files         build_dataset     build a TFDS dataset
  convert                  TF / timm weights -> ckpt   input_throughput  time the input pipeline
  flops                    count multiply-adds         benchmark         time a step, memory
  soak                     host memory over a run      export            StableHLO, SavedModel, TFLite
  reproduce                a checkpoint vs its expected mIoU

Nothing in the library imports this package.
"""
