"""Measured peak resident memory of one on-device `train` call of a TFLite export.

FedMef's point (Huang et al., CVPR 2024) is the memory of a client's training step. On a device
that is the memory the TFLite interpreter touches while it runs the `train` signature. This
module measures it on Linux from the kernel's own accounting of the process:

1. a fresh subprocess (`python -m tflite_export.memprobe MODEL --mode=train`) imports
   TensorFlow, loads the interpreter, creates the `train` signature runner (which allocates the
   tensors), fills a batch of inputs and calls the cheap `metadata` signature once: the first
   call of any signature runs the model's one-time initialisation (the `CALL_ONCE` of the
   session-init subgraph, which creates every variable and fills it from the file's constants),
   which is loading the model, not training (before this was done, the figure included it:
   about 186 MiB for ResNet18, the same for both variants);
2. it resets the peak resident set size (`echo 5 > /proc/self/clear_refs`, which sets `VmHWM`
   to the current `VmRSS`) and reads `VmRSS`;
3. it runs `train` once and reads `VmHWM`, the highest resident set size since the reset.

`VmHWM - VmRSS(before)` is the peak extra memory of the call. The same subprocess is run again
with `--mode=idle`, identical except that it does not call `train`; its figure (normally a few
hundred KiB of noise) is subtracted. Large allocations are forced onto `mmap`
(`MALLOC_MMAP_THRESHOLD_=65536` in the child's environment) so that freed buffers leave the
resident set instead of staying in glibc's heap, which makes the figure follow live memory.
The measurement runs single-threaded (TFLite kernels and select-TF kernels): with thread pools
the peak depends on timing (the same baseline export measured 37 and 59 MiB in two runs).

`steady_peak` is the same for a second `train` call in that process (its `VmHWM` over the
`VmRSS` before the first call): the arena already has its full size, so the first call's
growth steps (each a copy of the arena into a larger buffer, both resident for a moment) are
not in it, but everything the first call left resident is, and pages that the select-TF
kernels' allocator touches for the first time in the second call.

The figure includes everything the first call does: the TFLite arena pages it touches for the
first time (activations and gradients of builtin ops), buffers of select-TF ops, and the
one-time set-up of the select-TF-ops kernels, which is about the same for every model with the
same op types. It excludes the model file and the variables, which are resident before the call.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
from typing import Dict

__all__ = ['measure_train_peak', 'probe']

_STATUS = '/proc/self/status'
_PR_SET_PDEATHSIG = 1


def _status_kib(field: str) -> int:
  with open(_STATUS) as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise RuntimeError(f'{field} not found in {_STATUS}')


def _reset_peak() -> bool:
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def probe(
  model_path: str, mode: str, seed: int = 0, warmup: bool = True, num_threads: int = 1
) -> Dict[str, int]:
  """Runs in the measuring subprocess; returns the resident-memory figures in bytes.

  Args:
    model_path: a `.tflite` file with a `train(x, y)` signature.
    mode: 'train' (call `train` once) or 'idle' (same set-up, no call).
    seed: seed of the random input batch.
    warmup: first run `train` once in a throw-away interpreter of the same file.
    num_threads: threads of the TFLite kernels (the select-TF kernels follow
      `TF_NUM_INTRAOP_THREADS`, which `measure_train_peak` sets to the same number).

  Returns:
    `{'rss_before', 'hwm_after', 'peak_delta', 'steady_delta', 'reset'}`: bytes (`steady_delta`
    is a second call's `VmHWM` minus `rss_before`), and 1 if the peak could be reset (0: the
    figure includes the import peak and is not usable).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def load():
    interpreter = tf.lite.Interpreter(model_path=model_path, num_threads=num_threads)
    return interpreter, interpreter.get_signature_runner('train')

  interpreter, train = load()
  details = train.get_input_details()
  rng = np.random.RandomState(seed)
  x_shape = details['x']['shape']
  y_shape = details['y']['shape']
  meta = json.loads(interpreter.get_signature_runner('metadata')()['json'].item().decode())
  n_classes = int(meta.get('num_classes', 10))
  x = rng.standard_normal(x_shape).astype(np.float32)
  y = rng.randint(0, n_classes, size=y_shape).astype(np.int32)
  if warmup:
    # Process-wide one-time costs (code pages of the kernels, thread pools) are paid by a
    # throw-away interpreter; the measured one is fresh (its arena untouched).
    train(x=x, y=y)
    del train, interpreter
    gc.collect()
    interpreter, train = load()
  # The first call of any signature runs the model's one-time initialisation (CALL_ONCE of the
  # session-init subgraph): it allocates and fills every variable from the file's constants.
  # That is loading the model, not training: do it with the cheap `metadata` signature before
  # the peak is reset, so the figure is the train call's own memory.
  if 'metadata' in interpreter.get_signature_list():
    interpreter.get_signature_runner('metadata')()
  if mode not in ('train', 'idle'):
    raise ValueError(f"mode must be 'train' or 'idle', got {mode!r}")
  reset = _reset_peak()
  rss_before = _status_kib('VmRSS')
  if mode == 'train':
    train(x=x, y=y)
  hwm_after = _status_kib('VmHWM')
  # A second call: the arena is at its full size from the first one (which grew it in steps,
  # each a copy into a larger buffer, old and new resident together for a moment), so its peak
  # over the same starting point is the footprint of every later training step.
  reset = _reset_peak() and reset
  if mode == 'train':
    train(x=x, y=y)
  hwm_second = _status_kib('VmHWM')
  return {
    'rss_before': rss_before * 1024,
    'hwm_after': hwm_after * 1024,
    'peak_delta': (hwm_after - rss_before) * 1024,
    'steady_delta': (hwm_second - rss_before) * 1024,
    'reset': int(reset),
  }


def die_with_parent() -> None:
  """Runs in a child between fork and exec: the kernel sends it SIGKILL when its parent dies.

  (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere nothing is done.)
  """
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
  except OSError:
    pass


def _run_child(model_path: str, mode: str, timeout_s: float) -> Dict[str, int]:
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  env['MALLOC_MMAP_THRESHOLD_'] = '65536'
  # One thread everywhere: with a thread pool the peak depends on how many kernels' buffers
  # happen to be alive at once, and the figure varied by half from run to run.
  env['TF_NUM_INTRAOP_THREADS'] = '1'
  env['TF_NUM_INTEROP_THREADS'] = '1'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = root + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  proc = subprocess.run(
    [sys.executable, '-m', 'tflite_export.memprobe', model_path, f'--mode={mode}'],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout_s,
    check=False,
    preexec_fn=die_with_parent,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'memory probe ({mode}) failed: {tail}')
  return json.loads(lines[-1])


def measure_train_peak(
  model_path: str, *, repeats: int = 1, timeout_s: float = 600.0
) -> Dict[str, float]:
  """Peak extra resident memory of one `train` call, in bytes, from fresh subprocesses.

  Args:
    model_path: the `.tflite` file.
    repeats: number of (train, idle) subprocess pairs; the minimum of each is taken (the
      figure is a peak, noise only adds to it).
    timeout_s: limit per subprocess, seconds.

  Returns:
    `{'train_peak': bytes (train minus idle), 'steady_peak': bytes (a second call's peak over
    the same starting point, minus idle), 'train_delta': bytes, 'idle_delta': bytes,
    'rss_before': bytes}`.

  Raises:
    RuntimeError: a subprocess failed or the peak could not be reset.
  """
  train_runs = [_run_child(model_path, 'train', timeout_s) for _ in range(repeats)]
  idle_runs = [_run_child(model_path, 'idle', timeout_s) for _ in range(repeats)]
  if not all(r['reset'] for r in train_runs + idle_runs):
    raise RuntimeError('cannot reset the peak resident size (/proc/self/clear_refs)')
  train_delta = min(r['peak_delta'] for r in train_runs)
  idle_delta = min(r['peak_delta'] for r in idle_runs)
  steady_delta = min(r['steady_delta'] for r in train_runs)
  idle_steady = min(r['steady_delta'] for r in idle_runs)
  return {
    'train_peak': float(max(train_delta - idle_delta, 0)),
    'steady_peak': float(max(steady_delta - idle_steady, 0)),
    'train_delta': float(train_delta),
    'idle_delta': float(idle_delta),
    'rss_before': float(min(r['rss_before'] for r in train_runs)),
  }


def define_flags() -> None:
  """Defines the program's flags (when it runs as a program; the tests import the module)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_enum('mode', 'train', ('train', 'idle'), 'train: call train once; idle: do not')
  flags.DEFINE_integer('seed', 0, 'seed of the batch')


def main(argv) -> int:
  """`argv`: the program name and the model file (checked by `flag_parsing.flags_parser`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  print(json.dumps(probe(argv[1], flags.FLAGS.mode, flags.FLAGS.seed)), flush=True)
  return 0


if __name__ == '__main__':
  from fedmef_tf import flag_parsing  # pylint: disable=g-import-not-at-top

  define_flags()
  flag_parsing.run_tool(main, 'memprobe', __doc__, positional=('MODEL',), crash_dump=False)
