"""The command lines of the TFLite tools, their benchmark and the digits writer
(`fedmef_tf.flag_parsing`).

Each program parses absl flags: `--help` exits 0; a bad flag, a missing or an extra positional
argument exits 2 with one line `<program>: error: ...`. None of these runs reaches TensorFlow.
"""

import os
import subprocess
import sys

import pytest

from fedmef_tf import flag_parsing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def _error_line(proc, program):
  assert proc.returncode == flag_parsing.EXIT_USAGE, proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f'{program}: error: '), lines[0]
  return lines[0]


TOOLS = [
  ('tflite_export.verify', 'verify', ['--steps=3', '--runtime', 'litert', '--noin_process']),
  ('tflite_export.memprobe', 'memprobe', ['--mode=idle', '--seed', '1']),
  ('tflite_export.train_timing', 'train_timing', ['--num_threads=2', '--calls=3', '--warmup=0']),
  ('tflite_export.litert_runtime', 'litert_runtime', ['--child', '--num_threads=1']),
]


@pytest.mark.parametrize('module,program,good', TOOLS)
def test_tool_takes_one_model_and_reports_bad_flags_in_one_line(module, program, good):
  helped = _run(module, '--help')
  assert helped.returncode == 0 and '--' in helped.stdout, helped.stderr
  assert 'missing arguments: MODEL' in _error_line(_run(module, *good), program)
  assert 'unexpected arguments: b.tflite' in _error_line(
    _run(module, 'a.tflite', 'b.tflite', *good), program
  )
  assert "'nope'" in _error_line(_run(module, 'a.tflite', '--nope=1', *good), program)


def test_bad_flag_values_of_the_tools():
  verify, memprobe = 'tflite_export.verify', 'tflite_export.memprobe'
  assert '--runtime=foo' in _error_line(_run(verify, 'm', '--runtime=foo'), 'verify')
  assert '--steps=x' in _error_line(_run(verify, 'm', '--steps', 'x'), 'verify')
  assert '--mode=busy' in _error_line(_run(memprobe, 'm', '--mode=busy'), 'memprobe')
  assert '--child is required' in _error_line(
    _run('tflite_export.litert_runtime', 'm'), 'litert_runtime'
  )


def test_verify_of_a_missing_file_is_exit_2():
  proc = _run('tflite_export.verify', '/nonexistent.tflite', '--steps=1')
  assert proc.returncode == flag_parsing.EXIT_USAGE
  assert proc.stderr.strip() == 'verify: error: /nonexistent.tflite: no such file'


def test_tflite_memory_reports_every_bad_flag_in_one_line():
  line = _error_line(
    _run(
      'benchmarks.tflite_memory',
      '--threads=0',
      '--time_calls=0',
      '--max_im2col_kib=a',
      '--weight_grads=x',
      '--sap_storages=q',
      '--batch_sizes=8,b',
    ),
    'tflite_memory',
  )
  for flag in ('threads', 'time_calls', 'max_im2col_kib', 'weight_grads', 'sap_storages'):
    assert f'--{flag}' in line
  assert '--batch_sizes' in line
  assert 'unexpected arguments: extra' in _error_line(
    _run('benchmarks.tflite_memory', 'extra'), 'tflite_memory'
  )
  helped = _run('benchmarks.tflite_memory', '--help')
  assert helped.returncode == 0 and '--plain_step' in helped.stdout


def test_digits_writer_help_and_bad_command_lines():
  helped = _run('fedmef_tf.digits', '--help')
  assert helped.returncode == 0 and '--output' in helped.stdout, helped.stderr
  assert '--output is required' in _error_line(_run('fedmef_tf.digits'), 'digits')
  assert 'unexpected arguments: extra' in _error_line(
    _run('fedmef_tf.digits', 'extra', '--output=/nonexistent/d'), 'digits'
  )
  assert '--seed=x' in _error_line(_run('fedmef_tf.digits', '--seed=x', '--output=d'), 'digits')
