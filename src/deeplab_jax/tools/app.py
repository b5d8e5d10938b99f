"""The runner of every program: flags, start-up and errors handled one way.

A program is a module with `define_flags(flag_values)`, which defines its flags on the given
`absl.flags.FlagValues` (nothing is defined on import), and `main(argv, flag_values)`, which gets
the positional arguments after the program name. `run(program)` is the command line: the flags go on
absl's global FLAGS (with JAX's own `--jax_*` flags), the process joins a multi-process job when the
program defined the distributed flags (`distributed.define_flags`), and a `DeeplabError` (a bad
config, checkpoint, dataset or weights) ends the program with its one-line message and exit status
1; any other exception is a bug and keeps its traceback. `call(program, argv)` runs a program in
this process with flag values of its own, for tests and notebooks, and returns what `main` returns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from deeplab_jax import distributed
from deeplab_jax.errors import DeeplabError

UsageError = app.UsageError


def define_config_flag(flag_values: flags.FlagValues, *, required: bool = True,
                       help: str = 'Config file, e.g. configs/shapes.py; override fields with '
                       '--config.x.y=v.') -> None:
  """`--config=FILE` (an ml_collections config file, locked: unknown fields are errors)."""
  config_flags.DEFINE_config_file('config', None, help, lock_config=True, flag_values=flag_values)
  if required:
    flags.mark_flag_as_required('config', flag_values=flag_values)


def define_workdir_flag(flag_values: flags.FlagValues, *, required: bool = True,
                        help: str = 'Directory for checkpoints, logs and results (local or URL).'
                        ) -> None:
  """`--workdir=DIR`."""
  flags.DEFINE_string('workdir', None, help, flag_values=flag_values)
  if required:
    flags.mark_flag_as_required('workdir', flag_values=flag_values)


def no_arguments(argv: Sequence[str]) -> None:
  """UsageError for positional arguments a program does not take."""
  if argv:
    raise UsageError(f'Unexpected arguments: {list(argv)}')


def runner(module_name: str) -> Callable[[], None]:
  """The entry point of the program module `module_name` (`run = app.runner(__name__)`)."""
  return lambda: run(sys.modules[module_name])


def run(program: ModuleType) -> None:
  """Run `program` as the command line (see the module docstring); does not return."""
  import jax  # noqa: PLC0415 - its absl flags exist only for programs.

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  program.define_flags(flags.FLAGS)
  jax.config.config_with_absl()
  app.run(lambda argv: _run_main(program, argv))


def _run_main(program: ModuleType, argv: Sequence[str]) -> int | None:
  if 'coordinator_address' in flags.FLAGS:
    distributed.initialize_from_flags(flags.FLAGS)  # Before anything touches a device.
  try:
    result = program.main(list(argv[1:]), flags.FLAGS)
  except DeeplabError as e:
    logging.error('%s: %s', type(e).__name__, e)
    sys.exit(f'error: {e}')
  return result if isinstance(result, int) and not isinstance(result, bool) else None


def call(program: ModuleType, argv: Sequence[str] = ()) -> Any:
  """Run `program` in this process with its own flag values; returns what its `main` returns.

  `argv` holds the arguments after the program name, e.g. `['tf', '--checkpoint=...']`. Errors
  propagate as exceptions (a bad flag: `absl.flags.Error`).
  """
  argv = [program.__name__, *argv]
  saved, sys.argv = sys.argv, argv  # ml_collections finds `--config.x=y` overrides in sys.argv.
  try:
    flag_values = flags.FlagValues()
    program.define_flags(flag_values)
    args = flag_values(argv)
  finally:
    sys.argv = saved
  return program.main(list(args[1:]), flag_values)
