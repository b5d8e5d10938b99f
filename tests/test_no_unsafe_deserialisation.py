"""No unsafe deserialisation in the source tree: checkpoints and weights are never unpickled.

Loading a pickle runs arbitrary code, so a downloaded checkpoint or weight file must never reach
`pickle`, `torch.load` without `weights_only=True`, `np.load(allow_pickle=True)` or `yaml.load`
without a safe loader. The check parses every Python file under src/, launch/ and configs/ (so
comments and strings do not count) and names each offending file:line.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ('src', 'launch', 'configs')
PICKLE_MODULES = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'joblib', 'shelve',
                  'marshal', 'jsonpickle'}
SAFE_YAML_LOADERS = {'SafeLoader', 'CSafeLoader', 'BaseLoader', 'CBaseLoader'}


def _dotted(node: ast.AST) -> str:
  """'np.load' for the expression `np.load`; '' for anything that is not a dotted name."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return f'{base}.{node.attr}' if base else ''
  return ''


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
  return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.AST | None, value: bool) -> bool:
  return isinstance(node, ast.Constant) and node.value is value


def _problems_in_call(call: ast.Call) -> str | None:
  name = _dotted(call.func)
  if name.split('.')[0] in PICKLE_MODULES:
    return f'{name}(...) deserialises with pickle'
  if name == 'torch.load' and not _is_constant(_keyword(call, 'weights_only'), True):
    return 'torch.load(...) without weights_only=True unpickles'
  if name in ('np.load', 'numpy.load'):
    allow = _keyword(call, 'allow_pickle')
    if allow is not None and not _is_constant(allow, False):
      return f'{name}(..., allow_pickle=...) may unpickle'
  if name in ('pd.read_pickle', 'pandas.read_pickle'):
    return f'{name}(...) unpickles'
  if name in ('yaml.unsafe_load', 'yaml.unsafe_load_all', 'yaml.full_load', 'yaml.full_load_all'):
    return f'{name}(...) is not safe; use yaml.safe_load'
  if name in ('yaml.load', 'yaml.load_all'):
    loader = _keyword(call, 'Loader') or (call.args[1] if len(call.args) > 1 else None)
    if loader is None or _dotted(loader).rsplit('.', 1)[-1] not in SAFE_YAML_LOADERS:
      return f'{name}(...) without Loader=yaml.SafeLoader; use yaml.safe_load'
  return None


def scan_source(path: pathlib.Path) -> list[str]:
  """'file:line: problem' for every unsafe deserialisation in Python file `path`."""
  tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
  found = []
  for node in ast.walk(tree):
    problem = None
    if isinstance(node, ast.Import):
      bad = [a.name for a in node.names if a.name.split('.')[0] in PICKLE_MODULES]
      problem = f'imports {", ".join(bad)}' if bad else None
    elif isinstance(node, ast.ImportFrom):
      if (node.module or '').split('.')[0] in PICKLE_MODULES:
        problem = f'imports from {node.module}'
    elif isinstance(node, ast.Call):
      problem = _problems_in_call(node)
    if problem:
      found.append(f'{path}:{node.lineno}: {problem}')
  return found


def _python_files() -> list[pathlib.Path]:
  return sorted(p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob('*.py'))


def test_source_tree_has_no_unsafe_deserialisation():
  files = _python_files()
  assert any(p.name == 'checkpoint.py' for p in files), 'the scan must cover src/deeplab_jax'
  problems = [p for f in files for p in scan_source(f)]
  assert not problems, 'Unsafe deserialisation (untrusted files could run code):\n' + '\n'.join(
      problems)


@pytest.mark.parametrize('line, flagged', [
  ('import pickle', True),
  ('from pickle import loads', True),
  ('import joblib', True),
  ('x = pickle.loads(b"")', True),
  ('torch.load("w.pt")', True),
  ('torch.load("w.pt", weights_only=False)', True),
  ('torch.load("w.pt", map_location="cpu", weights_only=True)', False),
  ('np.load("a.npy", allow_pickle=True)', True),
  ('np.load("a.npy", allow_pickle=flag)', True),
  ('np.load("a.npy")', False),
  ('numpy.load("a.npy", allow_pickle=False)', False),
  ('yaml.load(text)', True),
  ('yaml.load(text, Loader=yaml.FullLoader)', True),
  ('yaml.load(text, Loader=yaml.SafeLoader)', False),
  ('yaml.load(text, yaml.CSafeLoader)', False),
  ('yaml.unsafe_load(text)', True),
  ('yaml.safe_load(text)', False),
  ('pd.read_pickle("a.pkl")', True),
  ('# pickle.loads in a comment', False),
  ('s = "torch.load(path)"', False),
])
def test_scanner_flags_unsafe_calls(tmp_path, line, flagged):
  path = tmp_path / 'module.py'
  path.write_text(f'"""Doc."""\n{line}\n')
  problems = scan_source(path)
  assert bool(problems) == flagged, problems
  if flagged:
    assert problems[0].startswith(f'{path}:2: ')
