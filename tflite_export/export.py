"""Export a FedMef model to a TFLite file with on-device training signatures.

FedMef (Huang et al., CVPR 2024, arXiv 2403.14737) trains a sparse model on memory-limited
clients. This program turns a model of this project into a `.tflite` file in which a phone can
run the client's local training (signatures of `tflite_export.train_module.TrainModule`:
`train`, `infer`, `set_learning_rate`, `get_weights`, `set_weights`, `save`, `restore`,
`metadata`), with the mask enforced and SAP active in `train`.

Usage (one source of the model):

    python -m tflite_export.export --root_dir=RUN --output=model.tflite
        # the final model of a `python -m tff_programs.train` run, RUN/final_model
    python -m tflite_export.export --model_dir=PATH --output=model.tflite
        # a directory written by `fedmef_tf.model_io.save_model`
    python -m tflite_export.export --model=cnn --variant=fedmef --density=0.1 --output=m.tflite
        # a freshly initialised registry model (variant 'tfmot': cnn only, see tfmot_model)

Shapes: `train` and `infer` take a fixed batch of `--batch_size` examples (x float32
`[B, H, W, C]`, y int32 `[B]`). Learning rate: a variable, initially `--learning_rate`, set on
the device with `set_learning_rate(lr)` (e.g. each round's eta_t), saved in checkpoints.

Memory layout of `train` (both masked variants alike): each masked kernel is updated inside its
own backward pass (`tflite_export.layer_updates`; `--nolayer_updates`: the plain step), and each
masked convolution runs its batch in slices whose im2col workspace fits in `--max_im2col_kib`
(`tflite_export.chunked_conv`; 0: whole batch); the convolutions' weight gradients and the
depthwise convolutions' gradients are made of builtin ops (`tflite_export.filter_grad`,
`tflite_export.depthwise_grad`; `--nobuiltin_weight_grads`: TF's select-TF
`Conv2DBackpropFilter` and `DepthwiseConv2dNativeBackprop*`).

It prints the file size, the density of each prunable kernel, whether the file needs
select-TF ops (`tflite_export.select_ops`; FedMef's exports need none and run on the stock
LiteRT runtime, docs/ANDROID.md) and the measured peak memory of one on-device `train` call
(`tflite_export.memprobe`). The file is written to a temporary name
next to `--output` (`.NAME.PID.XXXX.tmp`) and renamed into place only when everything
succeeded; on any error the program prints one line on stderr, exits with status 1 and leaves no
file at `--output` (an earlier file there is kept). Ctrl-C gives one line and status 130. A
temporary file that a killed export left behind is removed by the next export to the same
name; the memory probe's subprocess is killed by the kernel when the exporter dies. A model
with a NaN or infinite weight is refused.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
  'ExportError',
  'ExportReport',
  'export_model',
  'load_source',
  'kernel_densities',
  'convert',
  'main',
]

#: The name this program's error lines begin with (`export: error: ...`), as the other
#: programs of the project do.
PROGRAM = 'export'

RUN_MODEL_SUBDIR = 'final_model'
EXPORT_VARIANTS = ('fedmef', 'baseline', 'tfmot')
#: Default im2col budget of one CONV_2D in `train` (`tflite_export.chunked_conv`), KiB.
DEFAULT_MAX_IM2COL_KIB = 1024


class ExportError(Exception):
  """A user-facing export failure, with a one-line message."""


@dataclasses.dataclass
class ExportReport:
  """What an export wrote and measured.

  Attributes:
    path: the `.tflite` file.
    size_bytes: its size in bytes.
    densities: `(kernel name, nonzeros, size)` per prunable kernel.
    memory: `tflite_export.memprobe.measure_train_peak`'s dict (bytes), or None if not measured.
    metadata: the export configuration stored in the file.
    select_tf_ops: `{signature: TF op names of its select-TF operators}`
      (`tflite_export.select_ops`); all lists empty: the file runs on stock LiteRT.
  """

  path: str
  size_bytes: int
  densities: List[Tuple[str, int, int]]
  memory: Optional[Dict[str, float]]
  metadata: Dict[str, Any]
  select_tf_ops: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

  @property
  def needs_select_tf_ops(self) -> bool:
    """Whether any signature needs the select-TF-ops runtime."""
    return any(self.select_tf_ops.values())

  @property
  def global_density(self) -> float:
    total = sum(s for _, _, s in self.densities)
    return sum(n for _, n, _ in self.densities) / total if total else 1.0


def _parse_shape(text: str) -> Tuple[int, ...]:
  try:
    shape = tuple(int(v) for v in str(text).split(','))
  except ValueError as e:
    raise ExportError(f'--input_shape must be H,W,C integers, got {text!r}') from e
  if len(shape) != 3 or min(shape) < 1:
    raise ExportError(f'--input_shape must be three positive integers, got {text!r}')
  return shape


def _parse_floats(text: Optional[str], flag: str) -> Optional[List[float]]:
  if text is None:
    return None
  try:
    return [float(v) for v in str(text).split(',')]
  except ValueError as e:
    raise ExportError(f'{flag} must be comma-separated numbers, got {text!r}') from e


def load_source(
  *,
  root_dir: Optional[str] = None,
  model_dir: Optional[str] = None,
  model: Optional[str] = None,
  variant: str = 'fedmef',
  density: float = 0.1,
  gamma: float = 0.7,
  num_classes: int = 10,
  input_shape: Sequence[int] = (32, 32, 3),
  seed: int = 0,
  input_mean: Optional[Sequence[float]] = None,
  input_std: Optional[Sequence[float]] = None,
):
  """Builds or loads the Keras model to export, from exactly one source.

  Args:
    root_dir: a training run directory; its `final_model/` is loaded.
    model_dir: a saved model directory (`fedmef_tf.model_io`).
    model: a registry name (`fedmef_tf.models.MODEL_NAMES`), built fresh with `variant`,
      `density`, `gamma`, `num_classes`, `input_shape`, `seed`.
    variant: 'fedmef', 'baseline' or 'tfmot' (cnn only) for `model`.
    density: global density of the prunable kernels of a fresh model, in (0, 1].
    gamma: SAP drop ratio of a fresh fedmef model, in [0, 1].
    num_classes, input_shape, seed: of a fresh model.
    input_mean, input_std: input normalisation constants of a fresh model (per channel, in
      pixel / 255 units; None: no normalisation layer). A saved model carries its own.

  Returns:
    `(keras_model, config)`; config has at least model, variant, num_classes, input_shape,
    gamma, and `source`.

  Raises:
    ExportError: no or several sources, a directory without a saved model, an unknown name.
  """
  from fedmef_tf import model_io  # pylint: disable=import-outside-toplevel
  from fedmef_tf import models  # pylint: disable=import-outside-toplevel

  given = [
    n for n, v in (('--root_dir', root_dir), ('--model_dir', model_dir), ('--model', model)) if v
  ]
  if len(given) != 1:
    raise ExportError(
      'give exactly one of --root_dir, --model_dir, --model'
      + (f' (got {", ".join(given)})' if given else '')
    )
  if root_dir:
    if not os.path.isdir(root_dir):
      raise ExportError(f'{root_dir}: no such run directory')
    model_dir = os.path.join(root_dir, RUN_MODEL_SUBDIR)
    if not os.path.isdir(model_dir):
      raise ExportError(
        f'{root_dir}: run has no final model ({RUN_MODEL_SUBDIR}/ missing; '
        'did the training finish?)'
      )
  if model_dir:
    try:
      keras_model, config = model_io.load_model(model_dir)
    except model_io.ModelFileError as e:
      raise ExportError(str(e)) from e
    config = dict(config)
    config['source'] = os.path.abspath(model_dir)
    config.setdefault('gamma', 0.0)
    return keras_model, config
  if model not in models.MODEL_NAMES:
    raise ExportError(f"unknown model '{model}' (known: {', '.join(models.MODEL_NAMES)})")
  if variant not in EXPORT_VARIANTS:
    raise ExportError(f"unknown variant '{variant}' (known: {', '.join(EXPORT_VARIANTS)})")
  if not 0.0 < float(density) <= 1.0:
    raise ExportError(f'--density must be in (0, 1], got {density}')
  if not 0.0 <= float(gamma) <= 1.0:
    raise ExportError(f'--gamma must be in [0, 1], got {gamma}')
  input_shape = tuple(int(d) for d in input_shape)
  config = {
    'model': model,
    'variant': variant,
    'num_classes': int(num_classes),
    'input_shape': list(input_shape),
    'density': float(density),
    'seed': int(seed),
    'gamma': float(gamma) if variant == 'fedmef' else 0.0,
    'source': 'registry',
  }
  if input_mean is not None:
    config['input_mean'] = [float(v) for v in input_mean]
    config['input_std'] = [float(v) for v in input_std]
  if variant == 'tfmot':
    if model != 'cnn':
      raise ExportError(f"variant 'tfmot' exists for model 'cnn' only, not '{model}'")
    from tflite_export import tfmot_model  # pylint: disable=import-outside-toplevel

    keras_model = tfmot_model.build_tfmot_cnn(
      density=density, num_classes=num_classes, input_shape=input_shape, seed=seed
    )
  else:
    try:
      keras_model = models.build_model(
        model,
        variant,
        num_classes=int(num_classes),
        input_shape=input_shape,
        density=float(density),
        gamma=float(gamma),
        seed=int(seed),
        input_mean=input_mean,
        input_std=input_std,
      )
    except ValueError as e:
      raise ExportError(str(e)) from e
  return keras_model, config


def kernel_densities(model) -> List[Tuple[str, int, int]]:
  """`(name, nonzeros, size)` of every prunable kernel: masked layers' `kernel * mask`, or, in
  a model without masks, every Conv2D / DepthwiseConv2D / Dense kernel's nonzeros."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from fedmef_tf import masks  # pylint: disable=import-outside-toplevel

  out = []
  layers = masks.prunable_layers(model)
  if layers:
    for layer in layers:
      eff = layer.kernel.numpy() * layer.mask.numpy()
      out.append((layer.name, int(np.count_nonzero(eff)), int(eff.size)))
    return out
  kinds = (tf.keras.layers.Conv2D, tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Dense)
  for layer in model.layers:
    if isinstance(layer, kinds):
      k = (
        layer.depthwise_kernel
        if isinstance(layer, tf.keras.layers.DepthwiseConv2D)
        else layer.kernel
      ).numpy()
      out.append((layer.name, int(np.count_nonzero(k)), int(k.size)))
  return out


def convert(module) -> bytes:
  """Saves a `TrainModule` as a SavedModel (temporary) and converts it; returns the flatbuffer.

  Select TF ops are allowed (the BatchNorm baseline's training step needs them; the FedMef
  exports contain none, see `tflite_export.select_ops`) and resource variables are kept, so
  that `train`, `set_weights` and `restore` change state inside the interpreter.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel

  from tflite_export import train_module  # pylint: disable=import-outside-toplevel

  # The converter re-imports the SavedModel and warns once per function about the custom
  # gradients we chose not to save (they are not needed: the gradients are in the graph).
  logging.set_verbosity(logging.ERROR)
  tmp = tempfile.mkdtemp(prefix='fedmef_tflite_')
  try:
    # Saving may trace the module's functions again: keep the on-device SAP storage in force.
    with train_module.tflite_tracing(
      module.max_im2col_bytes, module.builtin_weight_grads, module.sap_storage
    ):
      signatures = module.signatures(for_tflite=True)
      # Gradients are already in the signatures: do not re-trace custom gradients for the file.
      options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
      tf.saved_model.save(module, tmp, signatures=signatures, options=options)
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    converter.target_spec.supported_ops = [
      tf.lite.OpsSet.TFLITE_BUILTINS,
      tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    converter.experimental_enable_resource_variables = True
    return converter.convert()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _check_output(output: str) -> str:
  if not output:
    raise ExportError('--output is required')
  output = os.path.abspath(output)
  parent = os.path.dirname(output)
  if os.path.isdir(output):
    raise ExportError(f'{output}: is a directory')
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise ExportError(f'{output}: cannot write, {parent} is not a directory')
  if not os.path.isdir(parent):
    raise ExportError(f'{output}: cannot write, directory {parent} does not exist')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ExportError(f'{output}: cannot write, directory {parent} is not writable')
  return output


def _check_binary_masks(keras_model) -> None:
  """The per-layer updates of `train` keep masks and BaE marked sets as bools
  (`tflite_export.layer_updates`): a model whose masks are not 0/1 would train otherwise on the
  device than in TF, so it is refused."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  for layer in keras_model.submodules:
    for attr in ('mask', 'marked'):
      v = getattr(layer, attr, None)
      if isinstance(v, tf.Variable):
        values = v.numpy()
        if not np.all((values == 0.0) | (values == 1.0)):
          raise ExportError(
            f'{v.name}: {attr} entries must be 0 or 1 for the on-device step '
            '(--nolayer_updates exports any values)'
          )


def _check_finite(keras_model) -> None:
  """Refuses a model with a NaN or infinite weight (a diverged training run)."""
  for v in keras_model.weights:
    values = v.numpy()
    if values.dtype.kind == 'f' and not np.all(np.isfinite(values)):
      bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
      raise ExportError(
        f'{v.name}: {bad} of {values.size} values are NaN or infinite; the '
        'model is not exported (did its training diverge?)'
      )


def remove_stale_temporaries(output: str) -> List[str]:
  """Removes temporary files of earlier exports to `output` whose process is gone.

  An export writes `.<name>.<pid>.<random>.tmp` beside `output` and renames it when done; a
  killed export leaves it behind. Files of a live process (an export running now) are kept.

  Returns:
    The names removed.
  """
  parent = os.path.dirname(os.path.abspath(output))
  prefix = f'.{os.path.basename(output)}.'
  removed = []
  for name in sorted(os.listdir(parent)):
    if not (name.startswith(prefix) and name.endswith('.tmp')):
      continue
    pid = name[len(prefix) :].split('.', 1)[0]
    if not pid.isdigit() or _pid_alive(int(pid)):
      continue
    try:
      os.remove(os.path.join(parent, name))
      removed.append(name)
    except FileNotFoundError:
      pass
  return removed


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def export_model(
  keras_model,
  config: Dict[str, Any],
  output: str,
  *,
  batch_size: int = 32,
  learning_rate: float = 0.1,
  measure_memory: bool = True,
  layer_updates: bool = True,
  max_im2col_kib: int = DEFAULT_MAX_IM2COL_KIB,
  builtin_weight_grads: bool = True,
  sap_storage: Optional[str] = None,
  before_replace: Optional[Callable[[], None]] = None,
) -> ExportReport:
  """Converts `keras_model` and writes it atomically to `output`.

  Args:
    keras_model: a built model (registry, loaded, or tfmot).
    config: its configuration (see `load_source`); stored in the file's `metadata`.
    output: path of the `.tflite` file; its directory must exist and be writable.
    batch_size: fixed batch size B of `train` and `infer`.
    learning_rate: initial SGD learning rate of `train`.
    measure_memory: measure the on-device peak of one `train` call (two subprocesses).
    layer_updates: update each masked kernel inside its own backward pass in `train`
      (`tflite_export.layer_updates`, the default); False: the plain step (all gradients, then
      all updates), kept for comparison.
    max_im2col_kib: run masked convolutions of `train` in batch slices whose im2col buffer
      fits in this many KiB (`tflite_export.chunked_conv`); 0: one CONV_2D per convolution.
    builtin_weight_grads: compute the weight gradients of masked convolutions in `train`
      from builtin ops (`tflite_export.filter_grad`, the default); False: the select-TF
      `Conv2DBackpropFilter`.
    sap_storage: how SAP ops select and keep their kept activations in `train`, a name of
      `tflite_export.static_sap.STORAGES` ('topk': TOPK_V2; 'radix': two radix histograms);
      None: `static_sap.DEFAULT_STORAGE`.
    before_replace: called after the new file is written and measured and just before it
      replaces `output`; an exception raised there removes the new file and keeps the old
      one (the program uses it to honour a Ctrl-C that Python swallowed, see `main`).

  Returns:
    An `ExportReport`.

  Raises:
    ExportError: bad arguments, unwritable output, conversion or measurement failure. No file
      is left at `output` (nor a temporary one beside it) when it is raised.
  """
  from tflite_export import memprobe  # pylint: disable=import-outside-toplevel
  from tflite_export import select_ops  # pylint: disable=import-outside-toplevel
  from tflite_export import static_sap  # pylint: disable=import-outside-toplevel
  from fedmef_tf import agc  # pylint: disable=import-outside-toplevel
  from tflite_export import train_module  # pylint: disable=import-outside-toplevel

  output = _check_output(output)
  if int(batch_size) < 1:
    raise ExportError(f'--batch_size must be >= 1, got {batch_size}')
  if not float(learning_rate) > 0.0:
    raise ExportError(f'--learning_rate must be > 0, got {learning_rate}')
  if int(max_im2col_kib) < 0:
    raise ExportError(f'--max_im2col_kib must be >= 0, got {max_im2col_kib}')
  _check_finite(keras_model)
  if layer_updates:
    _check_binary_masks(keras_model)
  sap_storage = static_sap.DEFAULT_STORAGE if sap_storage is None else str(sap_storage)
  if sap_storage not in static_sap.STORAGES:
    raise ExportError(
      f'--sap_storage must be one of {sorted(static_sap.STORAGES)}, got {sap_storage!r}'
    )
  metadata = dict(config)
  module = train_module.TrainModule(
    keras_model,
    batch_size=int(batch_size),
    learning_rate=float(learning_rate),
    metadata=metadata,
    layer_updates=layer_updates,
    max_im2col_bytes=int(max_im2col_kib) * 1024,
    builtin_weight_grads=builtin_weight_grads,
    sap_storage=sap_storage,
    gradient_clipping=agc.clipping_for(config['variant']),
  )
  try:
    flatbuffer = convert(module)
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).strip().splitlines()
    raise ExportError(f'TFLite conversion failed: {msg[0] if msg else type(e).__name__}') from e
  parent = os.path.dirname(output)
  remove_stale_temporaries(output)
  fd, tmp = tempfile.mkstemp(
    prefix=f'.{os.path.basename(output)}.{os.getpid()}.', suffix='.tmp', dir=parent
  )
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(flatbuffer)
      f.flush()
      os.fsync(f.fileno())
    memory = None
    if measure_memory:
      try:
        memory = memprobe.measure_train_peak(tmp)
      except (RuntimeError, OSError) as e:
        raise ExportError(f'measuring the on-device train peak failed: {e}') from e
    if before_replace is not None:
      before_replace()
    os.replace(tmp, output)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return ExportReport(
    path=output,
    size_bytes=len(flatbuffer),
    densities=kernel_densities(keras_model),
    memory=memory,
    metadata=json_metadata(module),
    select_tf_ops=select_ops.select_tf_ops_by_signature(flatbuffer),
  )


def json_metadata(module) -> Dict[str, Any]:
  import json  # pylint: disable=import-outside-toplevel

  return json.loads(module.metadata_json)


def format_report(report: ExportReport) -> str:
  """Human-readable lines: file size, kernel densities, on-device train peak."""
  lines = [
    f'wrote {report.path}: {report.size_bytes} bytes ({report.size_bytes / 2**20:.2f} MiB)',
    f'model {report.metadata.get("model")}/{report.metadata.get("variant")}, '
    f'batch {report.metadata["batch_size"]}, input {report.metadata["input_shape"]}, '
    f'gamma {report.metadata.get("gamma", 0.0)} (SAP storage '
    f'{report.metadata.get("sap_storage")}), '
    f'learning rate {report.metadata["learning_rate"]} (set_learning_rate to change)',
    'kernel densities (nonzeros / size):',
  ]
  for name, nnz, size in report.densities:
    lines.append(f'  {name:28s} {nnz:9d} / {size:9d} = {nnz / size:.4f}')
  lines.append(f'  {"global":28s} {report.global_density:.4f}')
  if report.needs_select_tf_ops:
    used = sorted({op for ops in report.select_tf_ops.values() for op in ops})
    users = '; '.join(f'{k} ({", ".join(v)})' for k, v in sorted(report.select_tf_ops.items()) if v)
    lines.append(
      f'select-TF ops: needed ({", ".join(used)}) by {users}: the app needs the '
      'select-TF-ops runtime (docs/ANDROID.md)'
    )
  else:
    lines.append(
      'select-TF ops: none; every signature runs on the stock LiteRT runtime (docs/ANDROID.md)'
    )
  if report.memory is not None:
    m = report.memory
    lines.append(
      f'on-device train peak (one call, VmHWM delta, minus idle): '
      f'{m["train_peak"] / 2**20:.2f} MiB '
      f'(train {m["train_delta"] / 2**20:.2f} MiB, idle {m["idle_delta"] / 2**20:.2f} '
      f'MiB, resident before {m["rss_before"] / 2**20:.1f} MiB)'
    )
  return '\n'.join(lines)


def _flags():
  """A fresh `FlagValues` with the program's flags (so that `run` can be called repeatedly)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  fv = flags.FlagValues()
  for define, name, default, help_text in (
    (
      flags.DEFINE_string,
      'root_dir',
      None,
      'training run directory (its final_model/ is exported)',
    ),
    (flags.DEFINE_string, 'model_dir', None, 'saved model directory (fedmef_tf.model_io)'),
    (flags.DEFINE_string, 'model', None, 'registry model name for a freshly initialised model'),
    (flags.DEFINE_string, 'variant', 'fedmef', 'fedmef, baseline or tfmot (with --model)'),
    (flags.DEFINE_float, 'density', 0.1, 'global kernel density of a fresh model'),
    (flags.DEFINE_float, 'gamma', 0.7, 'SAP drop ratio of a fresh fedmef model'),
    (flags.DEFINE_integer, 'num_classes', 10, 'number of classes of a fresh model'),
    (flags.DEFINE_string, 'input_shape', '32,32,3', 'H,W,C of a fresh model'),
    (
      flags.DEFINE_string,
      'input_mean',
      None,
      'per-channel input mean of a fresh model (pixel / 255 units, comma-separated); with '
      '--input_std the model normalises its input (a trained run carries its own)',
    ),
    (
      flags.DEFINE_string,
      'input_std',
      None,
      'per-channel input standard deviation, see --input_mean',
    ),
    (flags.DEFINE_integer, 'seed', 0, 'seed of a fresh model'),
    (flags.DEFINE_integer, 'batch_size', 32, 'fixed batch size of train/infer'),
    (flags.DEFINE_float, 'learning_rate', 0.1, 'initial SGD learning rate of train'),
    (flags.DEFINE_string, 'output', None, 'the .tflite file to write'),
    (flags.DEFINE_bool, 'measure_memory', True, 'measure the on-device train peak'),
    (
      flags.DEFINE_bool,
      'layer_updates',
      True,
      'update each masked kernel inside its backward pass (--nolayer_updates: plain step)',
    ),
    (
      flags.DEFINE_integer,
      'max_im2col_kib',
      DEFAULT_MAX_IM2COL_KIB,
      'im2col workspace per CONV_2D of train, KiB: convolutions run in batch slices that fit '
      '(0: whole batch)',
    ),
    (
      flags.DEFINE_bool,
      'builtin_weight_grads',
      True,
      'conv weight gradients and depthwise conv gradients from builtin ops '
      '(--nobuiltin_weight_grads: the select-TF Conv2DBackpropFilter and '
      'DepthwiseConv2dNativeBackprop*)',
    ),
    (
      flags.DEFINE_string,
      'sap_storage',
      None,
      "selection of SAP's kept activations in train: 'topk' (TOPK_V2) or 'radix' (two radix "
      'histograms over the float bit patterns; the same kept set); default: '
      'tflite_export.static_sap.DEFAULT_STORAGE',
    ),
  ):
    define(name, default, help_text, flag_values=fv)
  return fv


def run(argv: Sequence[str], stop_if_interrupted: Optional[Callable[[], None]] = None) -> int:
  """Parses `argv` (program name first), exports, prints; returns the exit status.

  `stop_if_interrupted` raises `KeyboardInterrupt` when a Ctrl-C was recorded. It is called just
  before the new file replaces `--output` (`export_model`'s `before_replace`) and when the export
  fails: a Ctrl-C that arrives while TensorFlow traces the model surfaces as a conversion error,
  and is reported as the interrupt it was.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from absl import flags  # pylint: disable=import-outside-toplevel

  fl = _flags()
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(__doc__.strip() + '\n\nFlags:\n' + fl.get_help())
    return 0
  try:
    rest = fl(list(argv))
  except flags.Error as e:
    print(f'{PROGRAM}: error: {e}', file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f'{PROGRAM}: error: unexpected arguments {rest[1:]}', file=sys.stderr)
    return 2
  try:
    _check_output(fl.output)
    keras_model, config = load_source(
      root_dir=fl.root_dir,
      model_dir=fl.model_dir,
      model=fl.model,
      variant=fl.variant,
      density=fl.density,
      gamma=fl.gamma,
      num_classes=fl.num_classes,
      input_shape=_parse_shape(fl.input_shape),
      seed=fl.seed,
      input_mean=_parse_floats(fl.input_mean, '--input_mean'),
      input_std=_parse_floats(fl.input_std, '--input_std'),
    )
    report = export_model(
      keras_model,
      config,
      fl.output,
      batch_size=fl.batch_size,
      learning_rate=fl.learning_rate,
      measure_memory=fl.measure_memory,
      layer_updates=fl.layer_updates,
      max_im2col_kib=fl.max_im2col_kib,
      builtin_weight_grads=fl.builtin_weight_grads,
      sap_storage=fl.sap_storage,
      before_replace=stop_if_interrupted,
    )
  except (ExportError, OSError, ValueError) as e:
    if stop_if_interrupted is not None:
      stop_if_interrupted()
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f'{PROGRAM}: error: {first}', file=sys.stderr)
    return 1
  print(format_report(report))
  return 0


def _inside_unraisable_code(frame) -> bool:
  """Whether `frame` runs (or is called from) a gc callback or a `__del__` method, where an
  exception does not propagate to the caller."""
  callbacks = [getattr(c, '__func__', c) for c in gc.callbacks]
  callback_codes = {c.__code__ for c in callbacks if hasattr(c, '__code__')}
  while frame is not None:
    if frame.f_code in callback_codes or frame.f_code.co_name == '__del__':
      return True
    frame = frame.f_back
  return False


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The program: `run`, with Ctrl-C as one line and status 130.

  Python raises a Ctrl-C as `KeyboardInterrupt` wherever the main thread is. Raised while the
  garbage collector runs (in a gc callback, as jax installs one, or a weakref callback) or in a
  finalizer, it would be printed as "Exception ignored" and lost; there the handler raises
  nothing and sets a 10 ms timer instead, whose SIGALRM raises the interrupt once that code has
  returned. SIGINT is also recorded, and a recorded one stops the export before its file
  replaces `--output`.
  """
  interrupted = []
  collecting = False

  def track_collection(phase, info):
    del info
    nonlocal collecting
    collecting = phase == 'start'

  def interrupt(signum, frame):
    if signum == signal.SIGINT:
      interrupted.append(signum)
    if collecting or _inside_unraisable_code(frame):
      signal.setitimer(signal.ITIMER_REAL, 0.01)
      return
    raise KeyboardInterrupt

  def stop_if_interrupted():
    if interrupted:
      raise KeyboardInterrupt

  previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGALRM)}
  gc.callbacks.insert(0, track_collection)  # first, so that it sees 'start' before the others
  try:
    return run(sys.argv if argv is None else argv, stop_if_interrupted=stop_if_interrupted)
  except KeyboardInterrupt:
    print(
      f'{PROGRAM}: error: interrupted; no file was written at --output '
      '(an earlier one there is kept)',
      file=sys.stderr,
    )
    return 130
  finally:
    gc.callbacks.remove(track_collection)
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in previous.items():
      signal.signal(s, handler)


if __name__ == '__main__':
  sys.exit(main())
