"""The README's section "Use as a library": its python blocks run, in order, as one script.

The script runs in a fresh interpreter (it builds a TFF process and runs a round in its own
`tff_programs.LocalRuntime`); the test fails when any block raises or asserts, or when the
section has no python block.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = 'Use as a library'


def library_blocks(readme: str):
  """The python code blocks of the README section `SECTION`, in order."""
  match = re.search(rf'^## {re.escape(SECTION)}\n(.*?)(?=^## |\Z)', readme, re.M | re.S)
  assert match, f'README.md has no section "## {SECTION}"'
  return re.findall(r'^```python\n(.*?)^```', match.group(1), re.M | re.S)


def test_the_section_has_the_promised_snippets():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    blocks = library_blocks(f.read())
  code = '\n'.join(blocks)
  assert len(blocks) >= 3
  for name in (
    'fedmef_tf.build_model',
    'fedmef_tf.sparsify(',
    '.fit(',
    'tff_programs.build_fedmef_process',
    'TestClientData',
    'assign_weights_to',
    'tf.keras.models.load_model',
    'fedmef_tf.custom_object_scope()',
    'tflite_export.export_model(',
    "get_signature_runner('train')",
  ):
    assert name in code, name
  assert 'custom_objects=' not in code


def test_library_snippets_run(tmp_path):
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    script = '\n'.join(library_blocks(f.read())) + '\nprint("README snippets: ok")\n'
  path = tmp_path / 'readme_library.py'
  path.write_text(script)
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  proc = subprocess.run(
    [sys.executable, str(path)],
    cwd=str(tmp_path),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'README snippets: ok' in proc.stdout


@pytest.mark.parametrize(
  'package,heavy', [('fedmef_tf', 'tensorflow_federated'), ('tff_programs', 'tensorflow')]
)
def test_importing_a_package_is_light(package, heavy):
  code = (
    f'import sys, {package}; names = {package}.__all__; print(len(names), {heavy!r} in sys.modules)'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert proc.returncode == 0, proc.stderr
  count, imported = proc.stdout.split()
  assert int(count) > 3 and imported == 'False', proc.stdout


def test_public_names_resolve():
  import fedmef_tf  # pylint: disable=import-outside-toplevel
  import tflite_export  # pylint: disable=import-outside-toplevel

  for name in fedmef_tf.__all__:
    assert getattr(fedmef_tf, name) is not None, name
  assert fedmef_tf.build_model is fedmef_tf.models.build_model
  assert callable(tflite_export.export_model)
  with pytest.raises(AttributeError):
    fedmef_tf.no_such_name  # pylint: disable=pointless-statement
