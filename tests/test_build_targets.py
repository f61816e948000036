"""Every Python module (subpackages included) and test file has a Bazel target (BUILD files are
kept complete)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('fedmef_tf', 'tff_programs', 'tflite_export', 'benchmarks')


def _build_text(directory):
  path = os.path.join(ROOT, directory, 'BUILD')
  assert os.path.isfile(path), f'{directory}/ has Python files but no BUILD file'
  with open(path) as f:
    # Drop comments so that a file named only in a comment does not count.
    return '\n'.join(line.split('#', 1)[0] for line in f)


def _quoted(text):
  return set(re.findall(r'"([^"]+)"', text))


def _py_files(directory):
  return sorted(
    f
    for f in os.listdir(os.path.join(ROOT, directory))
    if f.endswith('.py') and not f.startswith('.')
  )


def _package_py_files(package):
  """The package's Python files relative to it, those of subpackages without a BUILD of their
  own included (`sap/ops.py`): Bazel counts them in the package's BUILD."""
  found = []
  for base, dirs, files in os.walk(os.path.join(ROOT, package)):
    dirs[:] = sorted(
      d for d in dirs if d != '__pycache__' and not os.path.isfile(os.path.join(base, d, 'BUILD'))
    )
    rel = os.path.relpath(base, os.path.join(ROOT, package))
    found += [
      f if rel == '.' else f'{rel}/{f}'
      for f in sorted(files)
      if f.endswith('.py') and not f.startswith('.')
    ]
  return found


@pytest.mark.parametrize('package', PACKAGES)
def test_every_module_is_in_a_py_library_or_binary(package):
  names = _quoted(_build_text(package))
  missing = [f for f in _package_py_files(package) if f not in names]
  assert not missing, f'{package}/BUILD names no target for: {missing}'


def test_every_test_file_has_a_py_test():
  names = _quoted(_build_text('tests'))
  tests = [f[:-3] for f in _py_files('tests') if f.startswith('test_')]
  missing = [t for t in tests if t not in names and t + '.py' not in names]
  assert not missing, f'tests/BUILD has no py_test for: {missing}'
  # Bazel adds an empty __init__.py to runfiles directories; the source tree has none here.
  helpers = [f for f in _py_files('tests') if not f.startswith('test_') and f != '__init__.py']
  missing_helpers = [f for f in helpers if f not in names]
  assert not missing_helpers, f'tests/BUILD names no target for: {missing_helpers}'


def test_no_python_package_without_build():
  for entry in sorted(os.listdir(ROOT)):
    full = os.path.join(ROOT, entry)
    if (
      os.path.isdir(full)
      and os.path.isfile(os.path.join(full, '__init__.py'))
      and not entry.startswith('.')
    ):
      assert os.path.isfile(os.path.join(full, 'BUILD')), f'package {entry}/ has no BUILD file'
