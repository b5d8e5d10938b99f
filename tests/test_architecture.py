"""The shape of the package: no import cycles, programs only in `tools/`, no flags on import.

The import graph is read from the source with `ast` (every import statement, those inside functions
included, except under `if __name__ == '__main__':`, which never runs on import) and resolved to
modules of `deeplab_jax`.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil

from absl import flags

import deeplab_jax

PACKAGE = pathlib.Path(deeplab_jax.__file__).resolve().parent
PROGRAMS = ('deeplab_jax.main', 'deeplab_jax.tools')  # Modules that may import the programs' runner.


def module_files() -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module of the package (`__main__.py` files are programs)."""
  files = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    if path.name == '__main__.py':
      continue
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    files['.'.join(parts)] = path
  return files


def _is_main_guard(node: ast.AST) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__')


def _imports(tree: ast.AST, modules: set[str]) -> list[str]:
  """Modules of `modules` that `tree` imports: `from a.b import c` imports module `a.b.c` if there
  is one, else (a name defined in it) `a.b`."""
  names = []
  for node in ast.iter_child_nodes(tree):
    if _is_main_guard(node):
      continue
    if isinstance(node, ast.Import):
      names.extend(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        names.append(sub if sub in modules else node.module)
    names.extend(_imports(node, modules))
  return names


def import_graph() -> dict[str, set[str]]:
  """{module: the package's modules it imports}."""
  files = module_files()
  graph = {}
  for name, path in files.items():
    imported = _imports(ast.parse(path.read_text()), set(files))
    graph[name] = {m for m in imported if m in files and m != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done.
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_graph_covers_the_package():
  graph = import_graph()
  assert {'deeplab_jax.train', 'deeplab_jax.convert.timm', 'deeplab_jax.datasets.voc',
          'deeplab_jax.tools.app'} <= set(graph)
  assert 'deeplab_jax.train_state' in graph['deeplab_jax.train']


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, ' -> '.join(cycle)


def test_the_library_never_imports_the_programs():
  for name, targets in import_graph().items():
    if name.startswith(PROGRAMS):
      continue
    programs = sorted(t for t in targets if t.startswith(PROGRAMS))
    assert not programs, f'{name} imports {programs}'


def test_no_module_defines_flags_on_import():
  """Flags are defined only inside functions (a program's `define_flags`)."""
  for name, path in module_files().items():
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if not isinstance(
        n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not _is_main_guard(n)]
    for statement in top_level:
      for node in ast.walk(statement):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', '').startswith('DEFINE_'):
          raise AssertionError(f'{name}:{node.lineno} defines a flag on import')


def test_importing_every_module_defines_no_flag():
  for info in pkgutil.walk_packages(deeplab_jax.__path__, 'deeplab_jax.'):
    if not info.name.endswith('__main__'):
      importlib.import_module(info.name)
  ours = [m for m in flags.FLAGS.flags_by_module_dict() if 'deeplab_jax' in m]
  assert not ours and 'config' not in flags.FLAGS and 'workdir' not in flags.FLAGS



def _module_level_imports(tree: ast.AST) -> list[str]:
  """Names imported outside function bodies (what importing the module runs)."""
  names = []
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or _is_main_guard(node):
      continue
    if isinstance(node, ast.Import):
      names.extend(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.append(node.module)
    names.extend(_module_level_imports(node))
  return names


def test_only_drawing_functions_import_matplotlib():
  """The library imports matplotlib inside the functions that draw (`plots`), never on import,
  so the training path does not depend on it. (TensorFlow's Keras imports matplotlib.pyplot by
  itself when matplotlib is installed; that is outside this package.)"""
  for name, path in module_files().items():
    tree = ast.parse(path.read_text())
    eager = [m for m in _module_level_imports(tree) if m.split('.')[0] == 'matplotlib']
    assert not eager, f'{name} imports {eager} on import'
  lazy = [n for n in ast.walk(ast.parse((PACKAGE / 'plots.py').read_text()))
          if isinstance(n, ast.ImportFrom) and (n.module or '').startswith('matplotlib')]
  assert lazy  # The check above looks at the right module.
