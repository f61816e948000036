"""Lazy re-export of a package's public names (tfmot's pattern), shared by the packages.

A package's `__init__.py` names its public objects and the modules they live in; each is
imported on first use, so importing the package stays light (no TensorFlow, no TFF worker).
"""

import importlib
from typing import Callable, List, Mapping, Sequence, Tuple


def lazy_exports(
  package: str, exports: Mapping[str, str], modules: Sequence[str]
) -> Tuple[List[str], Callable, Callable]:
  """`(__all__, __getattr__, __dir__)` for the package named `package`.

  Args:
    package: the package's `__name__`.
    exports: public name -> submodule (of `package`) that defines it.
    modules: submodules that are public themselves.

  Returns:
    The three module attributes to assign in the package's namespace.
  """
  names = sorted(exports) + list(modules)

  def getattr_(name):
    if name in modules:
      return importlib.import_module(f'{package}.{name}')
    if name in exports:
      return getattr(importlib.import_module(f'{package}.{exports[name]}'), name)
    raise AttributeError(f'module {package!r} has no attribute {name!r}')

  def dir_():
    return sorted(set(names) | set(vars(importlib.import_module(package))))

  return names, getattr_, dir_
