"""A TFLite file's signatures run on the stock LiteRT runtime, in a child process.

LiteRT (`ai-edge-litert`, the Python package of the runtime Android apps ship) has the
resource-variable builtins but no select-TF (Flex) kernels: a file that runs on it needs no
select-TF-ops library in the app. In a process that has also imported TensorFlow, though,
LiteRT's interpreter finds TensorFlow's Flex delegate and runs select-TF operators as well
(checked here with `ai-edge-litert` 2.3.0 and TF 2.14: a `Save` op ran). So whatever must show
that a file runs on *stock* LiteRT runs in a child that imports only numpy and
`ai_edge_litert` (`python -m tflite_export.litert_runtime --child`); the child reports
whether TensorFlow was loaded into it, and `LiteRTInterpreter` refuses to work if it was.

`LiteRTInterpreter(model_path)` offers the part of `tf.lite.Interpreter`'s API that
`tflite_export.verify` uses: `get_signature_list()` and `get_signature_runner(name)(**inputs)
-> {output name: array}`. Inputs and outputs cross the pipe as `.npz` archives (numpy's
format, read with `allow_pickle=False`), each preceded by its length (8 bytes, little-endian).
A select-TF operator fails the call with LiteRT's own message, raised here as RuntimeError.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from typing import Any, Dict, Optional

import numpy as np

from fedmef_tf import flag_parsing

__all__ = ['LiteRTInterpreter', 'child_main']

_CALL = '__signature__'
_ERROR = '__error__'
_LIST = '__list__'
_CLOSE = '__close__'


def _plain(value) -> np.ndarray:
  """`value` as an array that `.npz` stores without pickle (string tensors come as object
  arrays of bytes: they become fixed-width bytes arrays)."""
  array = np.asarray(value)
  if array.dtype.kind == 'O':
    array = np.array([bytes(e) for e in array.ravel()], dtype=bytes).reshape(array.shape)
  return array


def _write(stream, arrays: Dict[str, Any]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{k: _plain(v) for k, v in arrays.items()})
  data = buf.getvalue()
  stream.write(struct.pack('<Q', len(data)))
  stream.write(data)
  stream.flush()


def _read(stream) -> Optional[Dict[str, np.ndarray]]:
  head = stream.read(8)
  if len(head) < 8:
    return None
  (size,) = struct.unpack('<Q', head)
  data = stream.read(size)
  if len(data) < size:
    return None
  with np.load(io.BytesIO(data), allow_pickle=False) as archive:
    return {k: archive[k] for k in archive.files}


class LiteRTInterpreter:
  """A stock LiteRT interpreter of `model_path`, in a child process without TensorFlow.

  Args:
    model_path: a `.tflite` file.
    num_threads: interpreter threads (None: LiteRT's default).

  Raises:
    RuntimeError: the child could not load the file, or TensorFlow was loaded into it.
  """

  def __init__(self, model_path: str, num_threads: Optional[int] = None):
    from tflite_export import memprobe  # pylint: disable=import-outside-toplevel

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env['PYTHONPATH'] = root + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    cmd = [sys.executable, '-m', 'tflite_export.litert_runtime', '--child', model_path]
    if num_threads is not None:
      cmd.append(f'--num_threads={int(num_threads)}')
    self._proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
      preexec_fn=memprobe.die_with_parent,
    )
    hello = self._receive()
    if _ERROR in hello:
      self.close()
      raise RuntimeError(str(hello[_ERROR]))
    if bool(hello['tensorflow_loaded']):
      self.close()
      raise RuntimeError(
        'TensorFlow was loaded into the LiteRT child: it is not the stock runtime there'
      )
    self._signatures = json.loads(str(hello[_LIST]))

  def _receive(self) -> Dict[str, np.ndarray]:
    reply = _read(self._proc.stdout)
    if reply is None:
      code = self._proc.wait()
      raise RuntimeError(f'the LiteRT child process ended (status {code})')
    return reply

  def get_signature_list(self) -> Dict[str, Dict[str, list]]:
    """`{signature: {'inputs': [...], 'outputs': [...]}}`, as `tf.lite.Interpreter` gives."""
    return self._signatures

  def get_signature_runner(self, name: str):
    """A callable `(**inputs) -> {output: array}` running signature `name` in the child."""
    if name not in self._signatures:
      raise ValueError(f'no signature {name!r} (the file has {sorted(self._signatures)})')

    def run(**inputs):
      _write(self._proc.stdin, dict(inputs, **{_CALL: name}))
      reply = self._receive()
      if _ERROR in reply:
        raise RuntimeError(str(reply[_ERROR]))
      return reply

    return run

  def close(self) -> None:
    """Ends the child (also done when this object is collected)."""
    proc = getattr(self, '_proc', None)
    if proc is None or proc.poll() is not None:
      return
    try:
      _write(proc.stdin, {_CLOSE: 1})
      proc.stdin.close()
      proc.wait(timeout=30)
    except (OSError, ValueError, subprocess.TimeoutExpired):
      proc.kill()
      proc.wait()

  def __del__(self):
    self.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def child_main(model_path: str, num_threads: Optional[int]) -> int:
  """The child: loads the file in `ai_edge_litert`'s interpreter and serves calls on
  stdin/stdout until stdin closes. Imports no TensorFlow."""
  # The protocol owns the original stdout; anything else printed goes to stderr.
  out = os.fdopen(os.dup(1), 'wb')
  os.dup2(2, 1)
  stdin = sys.stdin.buffer
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel

    kwargs = {} if num_threads is None else {'num_threads': num_threads}
    interpreter = Interpreter(model_path=model_path, **kwargs)
    signatures = interpreter.get_signature_list()
  except Exception as e:  # pylint: disable=broad-except
    _write(out, {_ERROR: f'{model_path}: LiteRT could not load it: {e}'})
    return 1
  _write(out, {_LIST: json.dumps(signatures), 'tensorflow_loaded': 'tensorflow' in sys.modules})
  runners = {}
  while True:
    request = _read(stdin)
    if request is None or _CLOSE in request:
      return 0
    name = str(request.pop(_CALL))
    try:
      if name not in runners:
        runners[name] = interpreter.get_signature_runner(name)
      outputs = runners[name](**request)
      _write(out, outputs)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      _write(out, {_ERROR: f'{name}: {first}'})


def _check_child(values) -> None:
  if not values['child']:
    raise flag_parsing.UsageError('--child is required (this module runs as a child process)')


if __name__ == '__main__':
  # absl is pure Python: the child still imports no TensorFlow.
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_bool('child', False, 'serve the signatures of MODEL on stdin/stdout (required)')
  flags.DEFINE_integer('num_threads', None, "interpreter threads (default: LiteRT's)")

  flag_parsing.run_tool(
    lambda argv: child_main(argv[1], flags.FLAGS.num_threads),
    'litert_runtime',
    __doc__,
    check=_check_child,
    positional=('MODEL',),
    crash_dump=False,
  )
