#!/usr/bin/env python3
"""Host memory across repeated orbax checkpoint saves, without training: is a rise ours or orbax's?

  python benchmarks/checkpoint_memory.py --tree=small --saves=200            # our manager (OCDBT)
  python benchmarks/checkpoint_memory.py --tree=small --saves=200 --manager=plain
  python benchmarks/checkpoint_memory.py --tree=small --saves=200 --manager=plain --no_ocdbt
  python benchmarks/checkpoint_memory.py --tree=xception_65 --saves=30       # a full VOC train state

Saves one tree `--saves` times into a temporary directory and prints one JSON object: the process's
anonymous memory (`deeplab_jax.tools.soak.anon_rss_mb`: after gc and malloc_trim) at regular intervals and
its Theil-Sen slope per save after the first 20% of the saves. `--manager=ours` is
`deeplab_jax.checkpoint.create_manager` + `save_tree`, as training uses them (async, keep 2 + best);
`--manager=plain` is a bare `orbax.checkpoint.CheckpointManager(max_to_keep=2)`, so a rise that
shows with both is orbax's. `--tree=small` is ~800 arrays of 2 KB (the size of the soak's tiny
model); `--tree=xception_65` the params, momentum and BatchNorm statistics of Xception-65 DeepLab
v3+ (1172 arrays, 329 MB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deeplab_jax import checkpoint, config, models
from deeplab_jax.tools import benchmark, soak


def make_tree(kind: str) -> dict:
  """The tree to save: 'small', or the train state of DeepLab with backbone `kind`."""
  if kind == 'small':
    rng = np.random.default_rng(0)
    return {'params': {f'p{i}': jnp.asarray(rng.normal(size=(8, 8, 8)), jnp.float32)
                       for i in range(400)},
            'batch_stats': {f'b{i}': jnp.zeros((8,)) for i in range(390)},
            'step': jnp.zeros((), jnp.int32)}
  c = config.get_base_config()
  c.model.backbone = kind
  variables = benchmark.synthetic_variables(models.build_model(c.model, 16), (65, 65))
  params = jax.tree.map(jnp.asarray, variables['params'])
  return {'params': params, 'batch_stats': jax.tree.map(jnp.asarray, variables['batch_stats']),
          'opt_state': jax.tree.map(lambda x: 0.5 * x, params), 'step': jnp.zeros((), jnp.int32)}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--tree', default='small', help="'small' or a backbone name")
  parser.add_argument('--saves', type=int, default=200)
  parser.add_argument('--samples', type=int, default=20, help='memory samples over the run')
  parser.add_argument('--manager', choices=('ours', 'plain'), default='ours')
  parser.add_argument('--no_ocdbt', action='store_true', help='plain manager: one zarr per array')
  args = parser.parse_args(argv)
  if args.no_ocdbt and args.manager == 'ours':
    parser.error('--no_ocdbt needs --manager=plain')
  tree = make_tree(args.tree)
  every = max(1, args.saves // args.samples)
  with tempfile.TemporaryDirectory(prefix='deeplab_ckmem_') as directory:
    if args.manager == 'ours':
      manager = checkpoint.create_manager(directory, keep=2)
    else:
      manager = ocp.CheckpointManager(
          directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
          item_handlers=ocp.PyTreeCheckpointHandler(use_ocdbt=not args.no_ocdbt))
    samples = [(0, soak.anon_rss_mb())]
    for step in range(1, args.saves + 1):
      checkpoint.save_tree(manager, step, tree)
      if step % every == 0 or step == args.saves:
        manager.wait_until_finished()
        samples.append((step, soak.anon_rss_mb()))
    manager.close()
  steady = [s for s in samples if s[0] >= args.saves // 5]
  print(json.dumps({
      'tree': args.tree, 'arrays': len(jax.tree.leaves(tree)),
      'tree_mb': round(sum(x.nbytes for x in jax.tree.leaves(tree)) / 1e6, 1),
      'manager': args.manager, 'ocdbt': not args.no_ocdbt, 'orbax': ocp.__version__,
      'saves': args.saves,
      'slope_mb_per_save': round(soak.slope_per_100_steps(steady) / 100, 3),
      'samples': [[s, round(mb, 1)] for s, mb in samples]}))


if __name__ == '__main__':
  main(sys.argv[1:])
