#!/usr/bin/env python3
"""Size, CPU latency and agreement with the JAX model of every export format (README "Deploy").

  python benchmarks/export_latency.py [--config=configs/voc_mobilenetv2.py] [--runs=5]

Builds the config's model with its own random initialisation (no checkpoint needed), writes it as
a workdir, exports it in every format with `deeplab_jax.export.export` (as the program does) and
times one image at the eval crop in each format's own runtime: JAX (`jax.jit`, this process),
StableHLO (`jax.export.deserialize(...).call`), TF SavedModel (`tf.saved_model.load`, TF's
runtime), both lowered for CPU, CUDA and TPU (grouped depthwise convs) and for the CPU only
(`_cpu`: shift-and-add), TFLite float32 and int8 (`tf.lite.Interpreter`, XNNPACK). Every format
returns labels and probabilities. Latency is the median of `--runs` calls after one warm-up call
(which compiles), padding and copying the outputs to numpy included. Agreement (`export.check`) is
measured on smooth random images of two sizes; int8 is calibrated on other such images. Random
weights and images: re-measure agreement on your data with `deeplab_jax.tools.export
--check_images=N`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from deeplab_jax import checkpoint, export, models


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def smooth_images(sizes, seed: int) -> list[np.ndarray]:
  """uint8 images with structure at several scales (random weights see textures, not noise)."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    image = np.zeros((h, w, 3))
    for cell in (64, 16, 4):
      coarse = rng.uniform(-80, 80, (h // cell + 2, w // cell + 2, 3))
      image += np.kron(coarse, np.ones((cell, cell, 1)))[:h, :w]
    out.append(np.clip(image + 127.5, 0, 255).astype(np.uint8))
  return out


def median_seconds(run, image, runs: int) -> float:
  run(image)  # Compiles / allocates.
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    out = run(image)
    np.asarray(out[export.PREDICTIONS])
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/voc_mobilenetv2.py')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--representative_images', type=int, default=8)
  args = parser.parse_args()
  config = load_config(args.config)
  crop = tuple(config.eval.crop_size)
  model = models.build_model(config.model)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *crop, 3)))
  variables = {c: jax.tree.map(np.asarray, dict(variables[c])) for c in ('params', 'batch_stats')}
  timed = smooth_images([crop], seed=0)[0]
  checked = smooth_images([crop, (crop[0] * 2 // 3, crop[1] - 13)], seed=1)
  representative = smooth_images([crop] * args.representative_images, seed=2)
  results = {'config': args.config, 'crop_size': list(crop), 'cpu_count': os.cpu_count(),
             'load_average': os.getloadavg(), 'formats': {}}
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, 'workdir')
    checkpoint.save_variables(workdir, variables, step=0)
    runs = {'jax': export.jax_runner(config, variables, export.DEFAULT_OUTPUTS)}
    sizes = {'jax': None}
    for kind, name, options in (
        ('stablehlo', 'stablehlo', {}),
        ('stablehlo', 'stablehlo_cpu', {'platforms': ('cpu',)}),
        ('savedmodel', 'savedmodel', {}),
        ('savedmodel', 'savedmodel_cpu', {'platforms': ('cpu',)}),
        ('tflite', 'tflite_float32', {'outputs': export.DEFAULT_OUTPUTS}),
        ('tflite', 'tflite_int8', {'quantize': 'int8'})):
      output = os.path.join(tmp, name)
      start = time.perf_counter()
      if options.get('quantize') == 'int8':  # The program calibrates on the dataset; here:
        export.export_tflite(config, variables, output, quantize='int8',
                             representative=representative, outputs=export.DEFAULT_OUTPUTS)
        report = {'bytes': export.artifact_bytes(output)}
      else:
        report = export.export(config, workdir, kind, output, **options)
      results['formats'][name] = {'export_seconds': time.perf_counter() - start,
                                  'bytes': report['bytes']}
      if kind == 'stablehlo':
        runs[name] = export.stablehlo_runner(export.load_stablehlo(output), config)
      elif kind == 'savedmodel':
        runs[name] = export.savedmodel_runner(output)
      else:
        runs[name] = export.TFLiteModel(output, models.mean_pixel(config.model.backbone))
      sizes[name] = report['bytes']
    results['formats'].setdefault('jax', {})
    for name, run in runs.items():
      entry = results['formats'][name]
      entry['latency_seconds'] = median_seconds(run, timed, args.runs)
      if name != 'jax':
        entry['check'] = export.check(config, variables, run, checked)
      print(name, json.dumps(entry), flush=True)
  results['load_average_after'] = os.getloadavg()
  print(json.dumps(results))


if __name__ == '__main__':
  main()
