"""Shared pytest fixtures.

`tff_runtime`: one TFF C++ worker for the whole test session, started and ended by
`tff_programs.runtime.LocalRuntime`, so no test leaves a `worker_binary` behind.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tff_programs import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

# Before any test imports TensorFlow: its C++ log lines stay out of the output (and out of the
# programs the tests start, which inherit the environment) unless FEDMEF_VERBOSE=1.
runtime.configure_logging()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def tff_runtime():
  """The session's TFF execution context; the worker is ended when the session ends."""
  rt = runtime.LocalRuntime(verbose=False)
  rt.start()
  try:
    yield rt
  finally:
    rt.stop()
