"""Shared pytest fixtures.

`tff_runtime`: one TFF C++ worker for the whole test session, started and ended by
`tff_programs.runtime.LocalRuntime`, so no test leaves a `worker_binary` behind.

`user_environment` (every test): the programs a test starts see the environment a user's shell
gives them. Importing TensorFlow sets environment variables in the importing process
(`TF2_BEHAVIOR=1` among them), and a program started with them inherits them: with
`TF2_BEHAVIOR=1` a program that imports TensorFlow for the first time inside absl's `main` builds
Keras models, without it the build fails (`fedmef_tf.flag_parsing.flags_parser`, `preload`).
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

#: The environment before any test module imports TensorFlow.
_USER_ENV = dict(os.environ)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(autouse=True)
def user_environment():
  """Removes what importing TensorFlow added to `os.environ` and restores what it changed (pytest's
  own `PYTEST_*` variables stay)."""
  for name in [n for n in os.environ if n not in _USER_ENV and not n.startswith('PYTEST_')]:
    del os.environ[name]
  for name, value in _USER_ENV.items():
    if os.environ.get(name) != value:
      os.environ[name] = value


@pytest.fixture(scope='session')
def tff_runtime():
  """The session's TFF execution context; the worker is ended when the session ends."""
  rt = runtime.LocalRuntime(verbose=False)
  rt.start()
  try:
    yield rt
  finally:
    rt.stop()
