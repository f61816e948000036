"""Runs one pytest file as a Bazel py_test: `pytest_main.py path/to/test_x.py`."""

import os
import sys

import pytest

if __name__ == '__main__':
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--rootdir', root] + sys.argv[1:]))
