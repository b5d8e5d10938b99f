"""Check a custom dataset folder before building it: every bad file, reported at once.

  python -m deeplab_jax.tools.check_dataset --root=ROOT [--num_classes=N]

Prints one line per problem (unreadable or missing images and masks, colour masks, image/mask size
mismatches, label values outside [0, num_classes) other than 255, split-file problems), the split
sizes and the classes no mask contains; exit status 1 when there are errors. Layout: see
`deeplab_jax.datasets.custom`.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from deeplab_jax.datasets import custom
from deeplab_jax.tools import app


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('root', None, 'Folder with images/, masks/, splits/.', flag_values=flag_values)
  flags.DEFINE_integer('num_classes', None, 'Number of classes (default: the lines of '
                       'ROOT/classes.txt).', flag_values=flag_values)
  flags.mark_flag_as_required('root', flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues) -> int:
  app.no_arguments(argv)
  root = flag_values.root
  report = custom.check_folder(root, flag_values.num_classes)
  for problem in report.problems:
    print(problem)
  sizes = ', '.join(f'{k}: {len(v)}' for k, v in report.splits.items())
  print(f'{root}: {report.num_classes} classes; splits {sizes or "none"}; '
        f'{sum(p.fatal for p in report.problems)} errors, '
        f'{sum(not p.fatal for p in report.problems)} warnings.')
  absent = [f'{i} ({n})' for i, n in enumerate(report.class_names) if report.pixel_counts[i] == 0]
  if report.class_names and absent:
    print(f'classes with no pixels in any readable mask: {", ".join(absent)}')
  return 0 if report.ok else 1


run = app.runner(__name__)

if __name__ == '__main__':
  run()
