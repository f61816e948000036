"""Median wall time of an on-device `train` call of a TFLite export.

A client pays for each `train` call in battery and in rounds it can take part in. This module
times the call the way an app makes it: one interpreter, the same fixed batch (images uniform in
[0, 1), the range of the training data, random labels), `train` called `warmup + calls` times;
the median of the last `calls` is the figure (the first calls grow the arena and touch the
kernels' code and thread pools, which later calls do not).

It runs in a fresh subprocess (`python -m tflite_export.train_timing MODEL --num_threads=N`)
with `tf.lite.Interpreter(num_threads=N)` and TensorFlow's own thread pools (which run the
select-TF kernels of files that have some) set to N as well, so a row measured at one thread
uses one thread throughout.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict

__all__ = ['time_train_calls', 'median_train_seconds']


def time_train_calls(
  model_path: str, *, num_threads: int, calls: int, warmup: int, seed: int = 0
) -> Dict[str, object]:
  """In this process: `{'seconds': [one float per timed call], 'median': float}`."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  interpreter = tf.lite.Interpreter(model_path=model_path, num_threads=num_threads)
  train = interpreter.get_signature_runner('train')
  details = train.get_input_details()
  meta = json.loads(interpreter.get_signature_runner('metadata')()['json'].item().decode())
  rng = np.random.RandomState(seed)
  x = rng.random_sample(details['x']['shape']).astype(np.float32)
  y = rng.randint(0, int(meta.get('num_classes', 10)), size=details['y']['shape']).astype(np.int32)
  for _ in range(warmup):
    train(x=x, y=y)
  seconds = []
  for _ in range(calls):
    start = time.perf_counter()
    train(x=x, y=y)
    seconds.append(time.perf_counter() - start)
  return {'seconds': seconds, 'median': statistics.median(seconds)}


def median_train_seconds(
  model_path: str,
  *,
  num_threads: int = 1,
  calls: int = 10,
  warmup: int = 2,
  timeout_s: float = 1200.0,
) -> float:
  """Median seconds of the `calls` `train` calls after `warmup` ones, in a fresh subprocess.

  Args:
    model_path: a `.tflite` file with `train(x, y)` and `metadata` signatures.
    num_threads: interpreter threads (and TensorFlow's intra- and inter-op threads).
    calls: timed calls (>= 1).
    warmup: untimed calls before them (>= 0).
    timeout_s: limit of the subprocess.

  Raises:
    ValueError: calls < 1, warmup < 0 or num_threads < 1.
    RuntimeError: the subprocess failed.
  """
  from tflite_export import memprobe  # pylint: disable=import-outside-toplevel

  if calls < 1 or warmup < 0 or num_threads < 1:
    raise ValueError(
      f'need calls >= 1, warmup >= 0, num_threads >= 1; got {calls}, {warmup}, {num_threads}'
    )
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  env['TF_NUM_INTRAOP_THREADS'] = str(num_threads)
  env['TF_NUM_INTEROP_THREADS'] = str(num_threads)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = root + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tflite_export.train_timing',
      model_path,
      f'--num_threads={num_threads}',
      f'--calls={calls}',
      f'--warmup={warmup}',
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout_s,
    check=False,
    preexec_fn=memprobe.die_with_parent,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'train timing failed: {tail}')
  return float(json.loads(lines[-1])['median'])


def define_flags() -> None:
  """Defines the program's flags (when it runs as a program; the tests import the module)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_integer('num_threads', 1, 'interpreter threads (and TensorFlow intra/inter-op)')
  flags.DEFINE_integer('calls', 10, 'timed train calls')
  flags.DEFINE_integer('warmup', 2, 'untimed train calls before them')


def main(argv) -> int:
  """`argv`: the program name and the model file (checked by `flag_parsing.flags_parser`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  args = flags.FLAGS
  result = time_train_calls(
    argv[1], num_threads=args.num_threads, calls=args.calls, warmup=args.warmup
  )
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  from fedmef_tf import flag_parsing  # pylint: disable=g-import-not-at-top

  define_flags()
  flag_parsing.run_tool(main, 'train_timing', __doc__, positional=('MODEL',), crash_dump=False)
