"""Checks a TFLite export of `tflite_export.export` by running every signature.

    python -m tflite_export.verify model.tflite [--steps=5] [--seed=0] [--runtime=tflite|litert]

`--runtime=tflite` (default) runs the file in `tf.lite.Interpreter` (TF 2.14, with the
select-TF ops); `--runtime=litert` runs every check on the stock LiteRT runtime
(`ai_edge_litert`, no select-TF ops, as an app that links only LiteRT), in a process of its
own without TensorFlow (`tflite_export.litert_runtime`): a file that needs select-TF ops
(`tflite_export.select_ops`) is refused there in one line with exit status 2.

The checks run in a child process, so that a damaged file that crashes the TFLite interpreter
(which does not validate a file before using it) gives one line and exit status 2, as does a
file that is not a TFLite file or holds NaN or infinite weights.

The file's `metadata` signature names the model (registry name, variant, classes, input shape,
gamma, batch size, weight names), so the TF model is rebuilt from it and loaded with the
file's own weights (`get_weights`). On one random batch (seeded; images uniform in [0, 1), the
range of the training data, `pixel / 255`) it checks (each comparison a function of
`tflite_export.checks`, whose result holds the numbers it measured):

1. `infer`: logits of shape `[B, classes]` equal the TF model's (`training=False`) within
   `INFER_TOL * max(1, max |logit|)` (float32 rounding grows with the logits' size).
1b. `dense_gradients` (exports with masks): equal to `growth.dense_kernel_gradients` of the TF model
   within the step tolerance below, relative to each kernel's largest gradient entry.
2. TF/TFLite step: one `train` step in the interpreter and the same step of the TF model
   (`TrainModule.train`, traced with `fedmef_tf.sap` as it is) give the same loss within
   `LOSS_RTOL` and the same update of every variable (masks and BatchNorm statistics
   included) within the step tolerance of that variable's largest update entry. The on-device
   graph stores SAP activations differently (`tflite_export.static_sap`) and its kernels sum
   in another order, so the match is not bitwise, and not to float rounding either: see
   "Step tolerance".
2a. SAP on the device (gamma > 0): the on-device step differs from the TF step of the same
   model built with gamma 0 by more than `SAP_EFFECT_MIN`.
2b. the same step with BaE on (exports with masks): half of each mask marked, lambda
   `BAE_LAMBDA`, loaded with `set_weights` in both; BaE must change the step.
3. masked zeros: after `--steps` more steps, every kernel entry whose mask is 0 is exactly 0,
   and the masks are unchanged (not applicable to an export without masks, e.g. tfmot's:
   reported, not failed).
4. loss falls: at the export's own learning rate, the loss of the last of the `--steps` steps
   on the same batch is below the first, and every loss is finite (the TF model's losses at
   the same rate are printed beside them).
5. `set_weights` then `get_weights` returns exactly what was set (bitwise).
6. `save`, its checkpoint vector written to a file and read back as the app does
   (`tflite_export.checkpoint`), `set_weights` (other values), then `restore` of what was
   read: every variable and the learning rate are exactly the saved ones, and `restore`
   returns them.
7. `set_learning_rate` changes the rate the next `train` uses (a step at lr 0 changes no
   trainable weight).

Step tolerance (checks 1b, 2, 2b). A ReLU (or BitReLU) mask entry flips where a
pre-activation lies within rounding of zero, and the two runtimes round differently (they sum
in other orders), so the TF result itself is defined only up to what a change of that size
does to it. verify measures this on the reference. The nudge size is calibrated first: every
input pixel and every nonzero float weight is multiplied by `1 + s * u` (`u` uniform in
[-1, 1], at least one float32 ulp), with `s` halved from the TFLite logits' relative distance
to TF's until the nudged TF model's logits are no farther from TF's than TFLite's are. Then the
TF computation is rerun `SPREAD_DRAWS` times so nudged, and each rerun's worst mismatch
against the unnudged TF result, over all variables, is the spread. Two measures, each per
variable, relative to the TF update (or gradient) of that variable: the largest entry,
`max|diff| / max|update|`, and the norm, `||diff|| / ||update||`. Each must be at most
`max(STEP_RTOL, SPREAD_FACTOR * spread)` of the same measure. A flip moves one or a few
entries, so it shows in the largest-entry measure and hardly in the norm; a wrong step (a
learning rate 10% off, SAP or a mask not applied) moves every entry and fails the norm
(`tests/test_tflite_export.py` checks that a 10%-off rate fails). A deep, BatchNorm-free
stack (MobileNetV2) moves its own TF step by several percent in single entries under
rounding-sized changes, so a fixed 2% would reject the TF step against itself; every check
prints the tolerance it was allowed.

Prints one line per check and exits with status 1 if any check fails (2 for an unreadable file).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Sequence

import numpy as np

from fedmef_tf import flag_parsing
from tflite_export import checks as checks_lib
from tflite_export.checks import INFER_TOL
from tflite_export.checks import LOSS_RTOL
from tflite_export.checks import SAP_EFFECT_MIN
from tflite_export.checks import SPREAD_FACTOR
from tflite_export.checks import STEP_RTOL
from tflite_export.checks import Check

__all__ = [
  'Check',
  'verify',
  'read_metadata',
  'open_interpreter',
  'main',
  'RUNTIMES',
  'LOSS_RTOL',
  'STEP_RTOL',
  'INFER_TOL',
  'SAP_EFFECT_MIN',
  'SPREAD_FACTOR',
]

#: The name this program's error lines begin with (`verify: error: ...`), as the other
#: programs of the project do.
PROGRAM = 'verify'

#: Interpreters `verify` can run a file in: TF's (with select-TF ops) and stock LiteRT.
RUNTIMES = ('tflite', 'litert')

#: Number of nudged reruns of the TF reference that measure its spread ("Step tolerance").
SPREAD_DRAWS = 2
#: Most halvings of the nudge size while calibrating it to the TFLite logits' distance.
NUDGE_HALVINGS = 16
#: BaE penalty weight of the BaE step check (the paper's lambda is 0.01; larger shows more).
BAE_LAMBDA = 0.5


def read_metadata(interpreter) -> Dict[str, Any]:
  """The export configuration stored in the file's `metadata` signature."""
  raw = interpreter.get_signature_runner('metadata')()['json']
  raw = raw.item() if hasattr(raw, 'item') else raw
  return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _rebuild(meta: Dict[str, Any]):
  """The TF model and TrainModule that the file was exported from (fresh variables)."""
  from fedmef_tf import models  # pylint: disable=import-outside-toplevel
  from tflite_export import tfmot_model  # pylint: disable=import-outside-toplevel
  from tflite_export import train_module  # pylint: disable=import-outside-toplevel

  if meta['variant'] == 'tfmot':
    model = tfmot_model.build_plain_cnn(
      num_classes=int(meta['num_classes']), input_shape=tuple(meta['input_shape'])
    )
  else:
    model = models.build_model(
      meta['model'],
      meta['variant'],
      num_classes=int(meta['num_classes']),
      input_shape=tuple(meta['input_shape']),
      gamma=float(meta.get('gamma', 0.0)),
      density=1.0,
      seed=int(meta.get('seed', 0)),
      input_mean=meta.get('input_mean'),
      input_std=meta.get('input_std'),
    )
  module = train_module.TrainModule(
    model,
    batch_size=int(meta['batch_size']),
    learning_rate=float(meta['learning_rate']),
    metadata={},
    gradient_clipping=meta.get('gradient_clipping'),
  )
  return model, module


def _nudged(
  a: np.ndarray, rng: np.random.RandomState, rel: float, nonzero_only: bool = False
) -> np.ndarray:
  """`a` times `1 + rel * u`, `u` uniform in [-1, 1] per entry, and at least one float32 ulp
  away from `a` in the direction of `u` (`nonzero_only`: zero entries kept)."""
  a = np.asarray(a, np.float32)
  u = rng.uniform(-1.0, 1.0, a.shape)
  moved = (a.astype(np.float64) * (1.0 + rel * u)).astype(np.float32)
  ulp = np.where(u >= 0, np.nextafter(a, np.float32(np.inf)), np.nextafter(a, np.float32(-np.inf)))
  moved = np.where(moved == a, ulp, moved)
  return np.where(a != 0, moved, a).astype(np.float32) if nonzero_only else moved


def _nudged_weights(weights: Dict[str, np.ndarray], rng: np.random.RandomState, rel: float):
  """The float variables nudged (nonzero entries, so masked zeros stay zero); masks, marked
  sets and scalars as they are."""
  out = {}
  for n, a in weights.items():
    a = np.asarray(a)
    keep = a.dtype != np.float32 or a.size <= 1 or n.endswith('_mask') or n.endswith('_marked')
    out[n] = a if keep else _nudged(a, rng, rel, nonzero_only=True)
  return out


def _load(model, names: Sequence[str], weights: Dict[str, np.ndarray]) -> None:
  """Assigns `weights` (by signature name) to the TF model's variables."""
  for v, n in zip(model.variables, names):
    v.assign(weights[n])


def open_interpreter(model_path: str, runtime: str = 'tflite'):
  """An interpreter of `model_path` with `get_signature_list` / `get_signature_runner`.

  Args:
    model_path: a `.tflite` file.
    runtime: 'tflite' (`tf.lite.Interpreter`) or 'litert' (stock LiteRT in a child process
      without TensorFlow, `tflite_export.litert_runtime.LiteRTInterpreter`).

  Raises:
    ValueError: unknown runtime, or 'litert' for a file that needs select-TF ops.
  """
  if runtime not in RUNTIMES:
    raise ValueError(f'runtime must be one of {", ".join(RUNTIMES)}, got {runtime!r}')
  if runtime == 'litert':
    from tflite_export import litert_runtime  # pylint: disable=import-outside-toplevel

    with open(model_path, 'rb') as f:
      compatible = checks_lib.litert_compatible(f.read())
    if not compatible.ok:
      raise ValueError(
        f'{model_path}: {compatible.detail}, which the stock LiteRT runtime does not have '
        '(use --runtime=tflite)'
      )
    return litert_runtime.LiteRTInterpreter(model_path)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf.lite.Interpreter(model_path=model_path)


def verify(
  model_path: str, *, steps: int = 5, seed: int = 0, runtime: str = 'tflite'
) -> List[Check]:
  """Runs the checks of the module docstring; returns one `Check` per check.

  This runs the file's signatures and the TF reference; each comparison is a function of
  `tflite_export.checks`, whose result holds the measured numbers.

  Args:
    model_path: a `.tflite` file written by `tflite_export.export`.
    steps: number of `train` steps of the loss and mask checks (>= 2).
    seed: seed of the sample batch.
    runtime: interpreter of the file, 'tflite' or 'litert' (see `open_interpreter`).

  Returns:
    The checks (`tflite_export.checks` results), in the order of the module docstring.

  Raises:
    ValueError: the file has no `metadata`/`train` signature or metadata that names no model;
      'litert' for a file that needs select-TF ops.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from tflite_export import checkpoint  # pylint: disable=import-outside-toplevel

  if steps < 2:
    raise ValueError(f'steps must be >= 2, got {steps}')
  interpreter = open_interpreter(model_path, runtime)
  sigs = interpreter.get_signature_list()
  present = checks_lib.required_signatures(sigs)
  if not present.ok:
    raise ValueError(f'{model_path}: {present.detail}')
  meta = read_metadata(interpreter)
  run = {s: interpreter.get_signature_runner(s) for s in checks_lib.SIGNATURES}
  names = list(meta['weight_names'])
  b = int(meta['batch_size'])
  rng = np.random.RandomState(seed)
  x = rng.random_sample((b, *meta['input_shape'])).astype(np.float32)  # images in [0, 1)
  y = rng.randint(0, int(meta['num_classes']), size=(b,)).astype(np.int32)
  checks: List[Check] = []

  w0 = run['get_weights']()
  finite = checks_lib.finite_weights(w0)
  if not finite.ok:
    raise ValueError(f'{model_path}: {finite.detail}; the file is not checked')
  lr0 = float(meta['learning_rate'])

  def reset():
    run['set_weights'](**w0)
    run['set_learning_rate'](lr=np.float32(lr0))

  # The TF model, loaded with the file's weights.
  model, module = _rebuild(meta)
  if [tuple(v.shape) for v in model.variables] != [tuple(w0[n].shape) for n in names]:
    raise ValueError(
      f'{model_path}: variables of the rebuilt {meta["model"]}/'
      f'{meta["variant"]} do not match the file'
    )
  _load(model, names, w0)

  # 1. infer.
  ref = model(x, training=False).numpy()
  infer = checks_lib.infer_matches(run['infer'](x=x)['logits'], ref)
  checks.append(infer)

  # Relative size of the nudge ("Step tolerance"): halved from the TFLite logits' relative
  # distance to TF's until the nudged TF model's logits are no farther from TF's than that.
  d = infer.max_abs_diff
  gap = d / max(1e-30, float(np.max(np.abs(ref))))
  nudge = max(float(np.finfo(np.float32).eps), gap)
  for _ in range(NUDGE_HALVINGS):
    r = np.random.RandomState(seed + 100)
    wn = _nudged_weights(w0, r, nudge)
    _load(model, names, wn)
    out = model(_nudged(x, r, nudge), training=False).numpy()
    if float(np.max(np.abs(out - ref))) <= d or nudge <= np.finfo(np.float32).eps:
      break
    nudge /= 2
  _load(model, names, w0)
  # The reference is rerun on these batches (and weights) to measure its spread.
  nudge_rngs = [np.random.RandomState(seed + 1 + i) for i in range(SPREAD_DRAWS)]
  nudged = [(_nudged(x, r, nudge), r) for r in nudge_rngs]  # (batch, rng of the weights)

  def tf_step(weights, batch):
    """One TF step from `weights` on `batch`: (loss, every variable after it)."""
    _load(model, names, weights)
    loss = float(module.train(tf.constant(batch), tf.constant(y))['loss'])
    return loss, {n: v.numpy() for n, v in zip(names, model.variables)}

  # 1b. Growth gradients (models with masks).
  if 'dense_gradients' in sigs:
    from fedmef_tf import growth  # pylint: disable=import-outside-toplevel
    from fedmef_tf import losses  # pylint: disable=import-outside-toplevel

    def tf_gradients(batch, weights=w0):
      _load(model, names, weights)
      g = growth.dense_kernel_gradients(
        model, tf.constant(batch), tf.constant(y), losses.example_losses
      )
      return {n: gi.numpy() for n, gi in zip(meta['gradient_names'], g)}

    g_lite = interpreter.get_signature_runner('dense_gradients')(x=x, y=y)
    g_tf = tf_gradients(x)
    reruns = [tf_gradients(xn, _nudged_weights(w0, r, nudge)) for xn, r in nudged]
    _load(model, names, w0)
    checks.append(checks_lib.dense_gradients_match(g_lite, g_tf, reruns))

  # 2. One step, TFLite against TF.
  loss_lite = float(run['train'](x=x, y=y)['loss'])
  w_lite = run['get_weights']()
  w_plain_step = w_lite
  loss_tf, w_tf = tf_step(w0, x)
  reruns = [tf_step(_nudged_weights(w0, r, nudge), xn)[1] for xn, r in nudged]
  checks.append(checks_lib.train_step_matches(loss_lite, loss_tf, w0, w_lite, w_tf, reruns, nudge))

  # 2a. SAP is active on the device: the step differs from the TF step without SAP.
  gamma = float(meta.get('gamma', 0.0))
  if gamma > 0.0:
    model0, module0 = _rebuild(dict(meta, gamma=0.0))
    _load(model0, names, w0)
    module0.train(tf.constant(x), tf.constant(y))
    w_nosap = {n: v.numpy() for n, v in zip(names, model0.variables)}
    checks.append(checks_lib.sap_effect(w0, w_lite, w_nosap, meta['gamma']))

  # 2b. The same with a BaE marked set and lambda loaded (adjustment round).
  pairs = checks_lib.mask_pairs(names)
  if pairs:
    bae = dict(w0)
    for kernel, mask in pairs:
      prefix = kernel[: -len('kernel')]
      marked = [n for n in names if n.endswith(prefix[5:] + 'marked')][0]
      lam = [n for n in names if n.endswith(prefix[5:] + 'bae_lambda')][0]
      half = rng.random_sample(w0[mask].shape) < 0.5
      bae[marked] = (w0[mask] * half).astype(np.float32)
      bae[lam] = np.asarray(BAE_LAMBDA, np.float32)
    run['set_weights'](**bae)
    run['set_learning_rate'](lr=np.float32(lr0))
    loss_lite = float(run['train'](x=x, y=y)['loss'])
    w_lite = run['get_weights']()
    loss_tf, w_tf = tf_step(bae, x)
    reruns = [tf_step(_nudged_weights(bae, r, nudge), xn)[1] for xn, r in nudged]
    checks.append(
      checks_lib.bae_step_matches(
        loss_lite,
        loss_tf,
        bae,
        w_lite,
        w_tf,
        w_plain_step,
        [k for k, _ in pairs],
        BAE_LAMBDA,
        reruns,
        nudge,
      )
    )

  # The loss-falls check runs at the export's own learning rate, in TF and on the device.
  _load(model, names, w0)
  module.set_learning_rate(tf.constant(lr0, tf.float32))
  tf_losses = [float(module.train(tf.constant(x), tf.constant(y))['loss']) for _ in range(steps)]

  # 3 and 4. Several steps on the same batch: masked zeros, loss falls.
  reset()
  run['set_learning_rate'](lr=np.float32(lr0))
  losses = [float(run['train'](x=x, y=y)['loss']) for _ in range(steps)]
  w_after = run['get_weights']()
  checks.append(checks_lib.masked_zeros(w0, w_after, pairs, steps))
  checks.append(checks_lib.loss_falls(losses, tf_losses, lr0))

  # 5. set/get round trip with values different from the current ones.
  other = {
    n: (
      w0[n] + rng.standard_normal(w0[n].shape).astype(w0[n].dtype)
      if w0[n].dtype.kind == 'f'
      else w0[n]
    )
    for n in names
  }
  run['set_weights'](**other)
  checks.append(checks_lib.round_trip(other, run['get_weights']()))

  # 6. save/restore round trip.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'client.ckpt')
    run['set_weights'](**w_after)
    run['set_learning_rate'](lr=np.float32(0.0123))
    saved = run['save']()['checkpoint']
    checkpoint.write_file(path, saved)  # what the app does with `save`'s output
    run['set_weights'](**other)
    run['set_learning_rate'](lr=np.float32(lr0))
    restored = run['restore'](checkpoint=checkpoint.read_file(path, saved.size))
    lr_back = float(restored.pop('learning_rate'))
    checks.append(
      checks_lib.save_restore(
        w_after, run['get_weights'](), restored, 0.0123, lr_back, os.path.getsize(path)
      )
    )

  # 7. learning rate: a step at lr 0 leaves every trainable weight as it was.
  reset()
  run['set_learning_rate'](lr=np.float32(0.0))
  run['train'](x=x, y=y)
  trainable = [n for n, v in zip(names, model.variables) if v.trainable]
  checks.append(checks_lib.learning_rate_applies(w0, run['get_weights'](), trainable))
  reset()
  return checks


def check_header(model_path: str) -> None:
  """Raises ValueError unless `model_path` starts like a TFLite flatbuffer (`TFL3`, root offset
  inside the file)."""
  size = os.path.getsize(model_path)
  with open(model_path, 'rb') as f:
    head = f.read(8)
  if len(head) < 8 or head[4:8] != b'TFL3':
    raise ValueError(f'{model_path}: not a TFLite file (no TFL3 identifier)')
  if not 8 <= int.from_bytes(head[:4], 'little') < size:
    raise ValueError(f'{model_path}: damaged TFLite file (its root table lies outside the file)')


def run_isolated(model_path: str, steps: int, seed: int, runtime: str = 'tflite') -> int:
  """Runs the checks in a child process (`--in_process`); returns its exit status.

  The TFLite interpreter does not validate a file before using it: a damaged file can make it
  crash (SIGSEGV). In a child the crash is reported in one line instead of ending this program.
  The child is killed when this process dies (`memprobe.die_with_parent`).
  """
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  from tflite_export import memprobe  # pylint: disable=import-outside-toplevel

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env['PYTHONPATH'] = root + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'tflite_export.verify',
      model_path,
      f'--steps={steps}',
      f'--seed={seed}',
      f'--runtime={runtime}',
      '--in_process',
    ],
    env=env,
    check=False,
    preexec_fn=memprobe.die_with_parent,
  )
  if proc.returncode < 0:
    name = signal.Signals(-proc.returncode).name
    print(
      f'{PROGRAM}: error: {model_path}: the TFLite interpreter crashed on this file ({name}): '
      'it is damaged or not written by tflite_export.export',
      file=sys.stderr,
    )
    return flag_parsing.EXIT_USAGE
  return proc.returncode


def define_flags() -> None:
  """Defines the program's flags (when it runs as a program; the tests import the module)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_integer('steps', 5, 'train steps of the masked-zeros and loss checks')
  flags.DEFINE_integer('seed', 0, 'seed of the random batch')
  flags.DEFINE_enum(
    'runtime',
    'tflite',
    RUNTIMES,
    'tflite: tf.lite.Interpreter (with select-TF ops); litert: stock LiteRT (ai_edge_litert, '
    'no select-TF ops)',
  )
  flags.DEFINE_bool('in_process', False, 'run the checks in this process, without crash isolation')


def main(argv: Sequence[str]) -> int:
  """`argv`: the program name and the model file (checked by `flag_parsing.flags_parser`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  args = flags.FLAGS
  model_path = argv[1]
  if not os.path.isfile(model_path):
    print(f'{PROGRAM}: error: {model_path}: no such file', file=sys.stderr)
    return flag_parsing.EXIT_USAGE
  try:
    check_header(model_path)
  except ValueError as e:
    print(f'{PROGRAM}: error: {e}', file=sys.stderr)
    return flag_parsing.EXIT_USAGE
  if not args.in_process:
    try:
      return run_isolated(model_path, args.steps, args.seed, args.runtime)
    except KeyboardInterrupt:
      print(f'{PROGRAM}: error: interrupted', file=sys.stderr)
      return flag_parsing.EXIT_INTERRUPTED
  # absl's app.run enables faulthandler; a crash of the interpreter in this child is reported by
  # the parent in one line (`run_isolated`), without a traceback dump on top.
  faulthandler.disable()
  try:
    checks = verify(model_path, steps=args.steps, seed=args.seed, runtime=args.runtime)
  except (ValueError, KeyError, RuntimeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if model_path not in first:
      first = f'{model_path}: {first}'
    print(f'{PROGRAM}: error: {first}', file=sys.stderr)
    return flag_parsing.EXIT_USAGE
  print(f'runtime: {args.runtime}')
  for c in checks:
    print(c.line())
  failed = [c.name for c in checks if c.ok is False]
  print(
    f'{len(checks) - len(failed)} of {len(checks)} checks passed or not applicable'
    + (f'; FAILED: {", ".join(failed)}' if failed else '')
  )
  return flag_parsing.EXIT_FAILURE if failed else flag_parsing.EXIT_OK


if __name__ == '__main__':
  define_flags()
  flag_parsing.run_tool(main, PROGRAM, __doc__, positional=('MODEL',), preload=('tensorflow',))
