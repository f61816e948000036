"""Saving and loading a trained model (weights and masks) with the configuration that rebuilds it.

A saved model is a directory:

* `model_config.json`: the registry arguments (`model`, `variant`, `num_classes`, `input_shape`,
  `gamma`, `density`, and `input_mean` / `input_std`, the input normalisation constants, where
  the model has them) and any extra fields the caller adds (`algorithm`, `round`, ...);
* `weights.h5`: every variable of the Keras model, masks and NSConv gains included, in Keras' HDF5
  weight format (no pickle anywhere).

The directory is written next to its final place and renamed into it, so a reader never sees a
half-written model.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Tuple

import tensorflow as tf

from fedmef_tf import models

CONFIG_FILE = 'model_config.json'
WEIGHTS_FILE = 'weights.h5'
_REQUIRED = ('model', 'variant', 'num_classes', 'input_shape')


class ModelFileError(ValueError):
  """A saved model directory is missing, incomplete, or names an unknown model."""


def custom_object_scope():
  """The scope in which Keras reads FedMef models: their layer classes by name.

  `tf.keras.models.load_model` of a whole saved FedMef model (`model.save(path)`) needs it:

      with fedmef_tf.custom_object_scope():
        model = tf.keras.models.load_model(path)

  Returns:
    A `tf.keras.utils.custom_object_scope` of `fedmef_tf.models.CUSTOM_OBJECTS`.
  """
  return tf.keras.utils.custom_object_scope(models.CUSTOM_OBJECTS)


def save_model(model: tf.keras.Model, config: Dict[str, Any], directory: str) -> str:
  """Writes `model`'s weights and `config` to `directory` atomically; returns the directory.

  Args:
    model: a model built by `fedmef_tf.models.build_model`.
    config: at least `model`, `variant`, `num_classes`, `input_shape`; JSON-serialisable.
    directory: target directory; replaced if it exists.
  """
  missing = [k for k in _REQUIRED if k not in config]
  if missing:
    raise ValueError(f'model config lacks {missing}')
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp_model_', dir=parent)
  try:
    model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    if os.path.isdir(directory):
      old = directory + '.old'
      shutil.rmtree(old, ignore_errors=True)
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_config(directory: str) -> Dict[str, Any]:
  """Returns the saved configuration, or raises ModelFileError with a one-line reason."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ModelFileError(f'{path}: no saved model here (missing {CONFIG_FILE})')
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelFileError(f'{path}: unreadable model config ({e})') from e
  missing = [k for k in _REQUIRED if k not in config]
  if missing:
    raise ModelFileError(f'{path}: model config lacks {missing}')
  if config['model'] not in models.MODEL_NAMES:
    raise ModelFileError(
      f"{path}: unknown model '{config['model']}' (known: {', '.join(models.MODEL_NAMES)})"
    )
  if config['variant'] not in models.VARIANTS:
    raise ModelFileError(f"{path}: unknown variant '{config['variant']}'")
  if not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
    raise ModelFileError(f'{os.path.join(directory, WEIGHTS_FILE)}: missing weights file')
  return config


def load_model(directory: str, **overrides) -> Tuple[tf.keras.Model, Dict[str, Any]]:
  """Rebuilds the model named in `directory` and loads its weights and masks.

  Args:
    directory: a directory written by `save_model`.
    **overrides: registry arguments to change (for example `gamma`).

  Returns:
    (model, config).
  """
  config = dict(read_config(directory))
  config.update(overrides)
  model = models.build_model(
    config['model'],
    config['variant'],
    num_classes=int(config['num_classes']),
    input_shape=tuple(config['input_shape']),
    gamma=float(config.get('gamma', 0.0)),
    density=1.0,
    seed=int(config.get('seed', 0)),
    input_mean=config.get('input_mean'),
    input_std=config.get('input_std'),
  )
  try:
    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
  except (OSError, ValueError, KeyError) as e:
    # h5py raises KeyError for a dataset missing from the file.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ModelFileError(
      f'{directory}: weights do not fit model {config["model"]}/'
      f'{config["variant"]} ({type(e).__name__}: {reason})'
    ) from e
  return model, config
