"""Rules of the source tree, read with `ast` (nothing is imported):

- no module assigns to (or deletes, or `setattr`s) an attribute of a module it imports, nor of a
  class it did not define (what varies between TF, TFF and TFLite is scoped with
  `fedmef_tf.execution`, not swapped by rebinding);
- no underscore name of another module is used (`mod._x`, `mod.Class._x`, `from mod import _x`,
  `getattr(mod, '_x')`);
- the project's modules import each other without cycles (imports inside functions included);
- `fedmef_tf` imports neither TFF nor the packages above it, `tflite_export` not the TFF
  programs.

The checker follows simple aliases (`cls = mod.Class`, `for c in (mod.A, mod.B)`), so that a
rebinding written through a local name is found as well; the first tests check that it finds
each kind of violation in small snippets.
"""

import ast
import os
from typing import Dict, Iterable, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('fedmef_tf', 'tff_programs', 'tflite_export', 'benchmarks')


def _files(package: str) -> List[str]:
  paths = []
  for base, dirs, files in os.walk(os.path.join(ROOT, package)):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')
    paths += [os.path.join(base, f) for f in sorted(files) if f.endswith('.py')]
  return paths


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[: -len('.py')].split(os.sep)
  if rel[-1] == '__init__':
    rel = rel[:-1]
  return '.'.join(rel)


def _is_private(name: str) -> bool:
  return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


def _root(node):
  while isinstance(node, ast.Attribute):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


class _Scan:
  """Violations of the rebinding and private-access rules in one module's source."""

  def __init__(self, source: str, label: str):
    self.tree = ast.parse(source, label)
    self.label = label
    self.imported: Set[str] = set()  # names bound by an import statement
    for node in ast.walk(self.tree):
      if isinstance(node, ast.Import):
        self.imported |= {(a.asname or a.name).split('.')[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        self.imported |= {a.asname or a.name for a in node.names}
    self.refs = set(self.imported)  # names that hold an imported module, class or function
    self._follow_aliases()

  def _is_ref(self, node) -> bool:
    """`node` names something imported: a name or attribute chain rooted at one (no call)."""
    if isinstance(node, (ast.Name, ast.Attribute)):
      return _root(node) in self.refs
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'type':
      return True  # type(obj) is a class
    return False

  def _is_ref_collection(self, node) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
      return bool(node.elts) and all(self._is_ref(e) for e in node.elts)
    return isinstance(node, ast.Name) and node.id in self.refs

  def _follow_aliases(self):
    changed = True
    while changed:
      changed = False
      for node in ast.walk(self.tree):
        names = []
        if isinstance(node, ast.Assign) and (
          self._is_ref(node.value) or self._is_ref_collection(node.value)
        ):
          names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.For, ast.comprehension)) and self._is_ref_collection(node.iter):
          names = [node.target.id] if isinstance(node.target, ast.Name) else []
        for name in names:
          if name not in self.refs:
            self.refs.add(name)
            changed = True

  def _where(self, node) -> str:
    return f'{self.label}:{node.lineno}: {ast.unparse(node)}'

  def rebinding(self) -> List[str]:
    found = []
    for node in ast.walk(self.tree):
      targets = []
      if isinstance(node, ast.Assign):
        targets = node.targets
      elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
      elif isinstance(node, ast.Delete):
        targets = node.targets
      elif isinstance(node, (ast.For, ast.comprehension)):
        targets = [node.target]
      elif isinstance(node, ast.withitem) and node.optional_vars is not None:
        targets = [node.optional_vars]
      for t in _unpacked(targets):
        if isinstance(t, ast.Attribute) and (self._is_ref(t.value) or _is_dunder_class(t.value)):
          found.append(f'{self.label}:{node.lineno}: {ast.unparse(t)} = ...')
        elif isinstance(t, ast.Subscript) and _namespace_of(t.value, self):
          found.append(f'{self.label}:{node.lineno}: {ast.unparse(t)} = ...')
      if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ('setattr', 'delattr')
        and node.args
        and self._is_ref(node.args[0])
      ):
        found.append(self._where(node))
    return found

  def private_access(self) -> List[str]:
    found = []
    for node in ast.walk(self.tree):
      if isinstance(node, ast.Attribute) and _is_private(node.attr) and self._is_ref(node.value):
        found.append(self._where(node))
      elif isinstance(node, ast.ImportFrom):
        parts = (node.module or '').split('.')
        if any(_is_private(p) for p in parts) or any(_is_private(a.name) for a in node.names):
          found.append(self._where(node))
      elif isinstance(node, ast.Import):
        if any(_is_private(p) for a in node.names for p in a.name.split('.')):
          found.append(self._where(node))
      elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ('getattr', 'hasattr', 'setattr')
        and len(node.args) >= 2
        and self._is_ref(node.args[0])
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _is_private(node.args[1].value)
      ):
        found.append(self._where(node))
    return found


def _unpacked(targets) -> List[ast.expr]:
  """Assignment targets with tuples, lists and starred targets opened."""
  out = []
  for t in targets:
    if isinstance(t, (ast.Tuple, ast.List)):
      out += _unpacked(t.elts)
    elif isinstance(t, ast.Starred):
      out += _unpacked([t.value])
    else:
      out.append(t)
  return out


def _is_dunder_class(node) -> bool:
  """`obj.__class__` (a class, whatever obj is)."""
  return isinstance(node, ast.Attribute) and node.attr == '__class__'


def _namespace_of(node, scan: _Scan) -> bool:
  """`vars(ref)` or `ref.__dict__`: the namespace of an imported module or class."""
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'vars':
    return bool(node.args) and scan._is_ref(node.args[0])  # pylint: disable=protected-access
  return isinstance(node, ast.Attribute) and node.attr == '__dict__' and scan._is_ref(node.value)  # pylint: disable=protected-access


def _scan_file(path: str) -> _Scan:
  with open(path, encoding='utf-8') as f:
    return _Scan(f.read(), os.path.relpath(path, ROOT))


# -- imports between the project's modules -----------------------------------------------------


def _imports(path: str, modules: Set[str]) -> Set[str]:
  """Project modules that `path` imports anywhere (functions included), without the implicit
  import of a module's parent packages."""
  name = _module_name(path)
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(parent + ([base] if base else []))
      for a in node.names:
        sub = f'{base}.{a.name}'
        targets.append(sub if sub in modules else base)
    elif (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr == 'import_module'
      and node.args
      and isinstance(node.args[0], ast.Constant)
      and isinstance(node.args[0].value, str)
    ):
      targets = [node.args[0].value]
    found |= {t for t in targets if t in modules and t != name}
  return found


def _import_graph(packages: Iterable[str]) -> Dict[str, Set[str]]:
  paths = [p for package in packages for p in _files(package)]
  modules = {_module_name(p) for p in paths}
  return {_module_name(p): _imports(p, modules) for p in paths}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, result = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        result.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return result


# -- the checker finds what it must ------------------------------------------------------------


@pytest.mark.parametrize(
  'source',
  [
    'from fedmef_tf import sap\nsap._compress = None\n',
    'from fedmef_tf import sap\nsap.conv2d = lambda *a: None\n',
    'from fedmef_tf import sap\nfor name in ("a",):\n  setattr(sap, name, None)\n',
    'from fedmef_tf import sparse_layers\ncls = sparse_layers.MaskedLayer\n'
    'cls.effective_kernel = None\n',
    'from fedmef_tf import sparse_layers as sl\nfor c in (sl.MaskedConv2D, sl.MaskedDense):\n'
    '  c.call = None\n',
    'from fedmef_tf import sparse_layers as sl\nsubclasses = (sl.MaskedConv2D, sl.MaskedDense)\n'
    'for c in subclasses:\n  c.call = None\n',
    'from fedmef_tf.sparse_layers import MaskedDense\nMaskedDense.call = None\n',
    'import tensorflow as tf\ntf.nn.conv2d = None\n',
    'from fedmef_tf import sap\ndel sap.after\n',
    'from fedmef_tf import sap\nsap.STRATEGIES += ("x",)\n',
    'from fedmef_tf import sap\na, sap.after = 1, None\n',
    'from fedmef_tf import sap\nvars(sap)["after"] = None\n',
    'def f(layer):\n  type(layer).call = None\n',
  ],
)
def test_the_checker_finds_rebinding(source):
  assert _Scan(source, 'snippet').rebinding()


@pytest.mark.parametrize(
  'source',
  [
    'class A:\n  pass\nA.x = 1\n',  # a class of this module
    'from fedmef_tf import sparse_layers\nlayer = sparse_layers.MaskedDense(3)\n'
    'layer.name_scope_hint = 1\n',  # an instance, not the class
    'import numpy as np\nx = np.zeros(3)\nx[0] = 1\n',
    'import os\nos.environ["A"] = "1"\n',  # an item, not an attribute
    'from fedmef_tf import sap\nd = {}\nd[sap.STORED] = 1\n',
    'X = 1\ndef f():\n  global X\n  X = 2\n',
  ],
)
def test_the_checker_lets_ordinary_assignments_pass(source):
  assert not _Scan(source, 'snippet').rebinding()


@pytest.mark.parametrize(
  'source',
  [
    'from fedmef_tf import sap\nsap._compress(1, 0.5)\n',
    'from tff_programs import runtime\nruntime._make_stub()\n',
    'from fedmef_tf import sparse_layers\nsparse_layers.MaskedLayer._op\n',
    'from fedmef_tf.sap import _storage\n',
    'from fedmef_tf import sap\ngetattr(sap, "_storage")\n',
    'from fedmef_tf import sparse_layers as sl\ncls = sl.MaskedLayer\ncls._op\n',
  ],
)
def test_the_checker_finds_private_access(source):
  assert _Scan(source, 'snippet').private_access()


def test_the_checker_lets_public_and_own_names_pass():
  source = (
    'import tensorflow as tf\nfrom fedmef_tf import sap\n_LOCAL = 1\n'
    'def _helper():\n  return _LOCAL\nsap.after(tf.__internal__, 1)\n'
    'def f(layer):\n  return layer._probe\n'
  )
  assert not _Scan(source, 'snippet').private_access()


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) == []


# -- the tree follows the rules ----------------------------------------------------------------


@pytest.mark.parametrize('package', PACKAGES)
def test_no_module_rebinds_another_modules_attributes_or_methods(package):
  found = [v for path in _files(package) for v in _scan_file(path).rebinding()]
  assert not found, 'rebinding:\n' + '\n'.join(found)


@pytest.mark.parametrize('package', PACKAGES)
def test_no_private_name_of_another_module_is_used(package):
  found = [v for path in _files(package) for v in _scan_file(path).private_access()]
  assert not found, 'private access:\n' + '\n'.join(found)


def test_the_project_modules_import_each_other_without_cycles():
  graph = _import_graph(PACKAGES)
  assert 'fedmef_tf.sap' in graph['fedmef_tf.sparse_layers']  # the graph sees imports
  cycles = _cycles(graph)
  assert not cycles, f'import cycles: {cycles}'


@pytest.mark.parametrize(
  'package,forbidden',
  [
    ('fedmef_tf', ('tensorflow_federated', 'tff_programs', 'tflite_export', 'benchmarks')),
    ('tflite_export', ('tensorflow_federated', 'tff_programs', 'benchmarks')),
  ],
)
def test_the_layers_import_only_downwards(package, forbidden):
  found = []
  for path in _files(package):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = (
        [a.name for a in node.names]
        if isinstance(node, ast.Import)
        else [node.module or '']
        if isinstance(node, ast.ImportFrom) and not node.level
        else []
      )
      found += [
        f'{os.path.relpath(path, ROOT)}:{node.lineno}: {n}'
        for n in names
        if n.split('.')[0] in forbidden
      ]
  assert not found, '\n'.join(found)
