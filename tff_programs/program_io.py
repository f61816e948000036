"""What a training program writes under `--root_dir`, and how it resumes from it.

Layout of a run directory:

- `config.json` (`prepare_root_dir`, called when the first round starts): every flag that changes
  the result; a rerun must match. A run of another length (`--rounds`) is refused with the
  reason: its schedules follow `--rounds` (`LENGTH_KEYS`).
- `checkpoints/program_state_<round>.npz` (`tff_programs.checkpoints`): the program state after
  each round, as tensors only (loaded as data, never run), written to a temporary file and
  renamed (atomic); the last two are kept.
- `.lock` (`tff_programs.run_lock`): held by the running program, holds its PID.
- `metrics.csv` (`tff.program.CSVFileReleaseManager`): one row per round, key `round`.
- `tensorboard/` (`tff.program.TensorBoardReleaseManager`): the same scalars as events.
- `summary.json` (`write_json`): the end-of-run report.
- `plots/*.png` (`plot_*`): accuracy/loss against round, per-layer density, memory.
- `final_model/` (`fedmef_tf.model_io.save_model`): `weights.h5` (weights and masks) and
  `model_config.json`.

`--overwrite` removes exactly these entries and nothing else in the directory.
"""

import asyncio
import csv
import errno
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

from fedmef_tf import text

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.csv'
TENSORBOARD_DIR = 'tensorboard'
SUMMARY_FILE = 'summary.json'
PLOTS_DIR = 'plots'
FINAL_MODEL_DIR = 'final_model'
RUN_ENTRIES = (
  CONFIG_FILE,
  CHECKPOINT_DIR,
  METRICS_FILE,
  TENSORBOARD_DIR,
  SUMMARY_FILE,
  PLOTS_DIR,
  FINAL_MODEL_DIR,
)
_KEEP_CHECKPOINTS = 2


class RunDirError(Exception):
  """The run directory cannot be used (one-line message naming it and why)."""

  def __init__(self, message: str):
    super().__init__(text.one_line(message))


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically (temporary file in the same folder, rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp_', suffix='.json', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(value, f, indent=2, sort_keys=True)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _differences(
  old: Mapping[str, Any], new: Mapping[str, Any], names: text.SettingNames
) -> List[str]:
  keys = sorted(set(old) | set(new))
  return [
    f'{names.setting(k, old.get(k, "(unset)"))} there, {new.get(k, "(unset)")} now'
    for k in keys
    if old.get(k) != new.get(k)
  ]


def clear_run(root_dir: str) -> None:
  """Removes the entries a run writes (`RUN_ENTRIES`) from `root_dir`; nothing else."""
  for name in RUN_ENTRIES:
    path = os.path.join(root_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


#: Configuration entries derived from the data (the input normalisation constants of the
#: training split): known only once the data is loaded, so a check before that leaves them out.
DATA_KEYS = ('input_mean', 'input_std')


def check_root_dir(
  root_dir: str,
  config: Mapping[str, Any],
  overwrite: bool,
  ignore: Sequence[str] = (),
  names: text.SettingNames = text.KEYWORDS,
) -> bool:
  """Checks, without writing anything, that `root_dir` can hold a run of `config`.

  A new or empty directory, or one without run entries, is fine. A directory whose
  `config.json` equals `config` is resumed. A directory written by a different configuration,
  or holding run entries without a `config.json`, is refused unless `overwrite`.

  Args:
    root_dir: the run directory.
    config: JSON-serialisable flag values that determine the result.
    overwrite: start afresh in a directory written by another configuration.
    ignore: configuration keys left out of the comparison (`DATA_KEYS` before the data is
      loaded).
    names: how the messages name the settings (`root_dir`, `overwrite` and the configuration
      keys); a program passes `fedmef_tf.text.FLAGS`.

  Returns:
    True when `root_dir` holds a run of the same configuration (its checkpoints are resumed).

  Raises:
    RunDirError: when the directory belongs to another configuration (and not `overwrite`) or
      is not a directory.
  """
  config = json.loads(json.dumps(dict(config)))  # normalise tuples etc. as JSON reads them
  config = {k: v for k, v in config.items() if k not in ignore}
  config_path = os.path.join(root_dir, CONFIG_FILE)
  if os.path.exists(root_dir) and not os.path.isdir(root_dir):
    raise RunDirError(f'{names.setting("root_dir", root_dir)}: exists and is not a directory')
  if os.path.isfile(config_path):
    try:
      old = read_json(config_path)
    except (OSError, ValueError) as e:
      old = {'(unreadable config.json)': str(e).splitlines()[0] if str(e) else 'error'}
    if isinstance(old, dict):
      old = {k: v for k, v in old.items() if k not in ignore}
    if old == config:
      return True
    if not overwrite and isinstance(old, dict):
      refusal = _length_refusal(root_dir, old, config, names)
      if refusal:
        raise RunDirError(refusal)
    if not overwrite:
      diffs = (
        _differences(old, config, names) if isinstance(old, dict) else ['config.json unreadable']
      )
      more = f' (and {len(diffs) - 2} more)' if len(diffs) > 2 else ''
      raise RunDirError(
        f'{names.setting("root_dir", root_dir)} holds a run of another '
        f'configuration ({"; ".join(diffs[:2])}{more}); rerun with '
        f'{names.name("overwrite")} to replace it, or choose another '
        f'{names.name("root_dir")}'
      )
  elif os.path.isdir(root_dir) and not overwrite:
    present = [n for n in RUN_ENTRIES if os.path.lexists(os.path.join(root_dir, n))]
    if present:
      raise RunDirError(
        f'{names.setting("root_dir", root_dir)} holds {", ".join(present)} but '
        f'no {CONFIG_FILE}; rerun with {names.name("overwrite")} to replace '
        f'them, or choose another {names.name("root_dir")}'
      )
  return False


# The configuration keys of the run's length and of the schedules derived from it.
LENGTH_KEYS = ('rounds', 'delta_t', 't_end', 'eval_every')


def _length_refusal(
  root_dir: str, old: Mapping[str, Any], new: Mapping[str, Any], names: text.SettingNames
) -> str:
  """The refusal of a run that differs from the one in `root_dir` only in its length, or ''.

  Such a run does not continue the stored one: the client learning rate of every round decays
  exponentially to `client_lr_min` at round `rounds`, and the mask adjustments follow
  `delta_t` and `t_end`, so the rounds already run would have been different.
  """
  changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if 'rounds' not in changed or not set(changed) <= set(LENGTH_KEYS):
    return ''
  state = 'finished' if os.path.isfile(os.path.join(root_dir, SUMMARY_FILE)) else 'unfinished'
  n = names.name
  return (
    f'{names.setting("root_dir", root_dir)} holds a {state} run of '
    f'{names.setting("rounds", old.get("rounds"))} that '
    f'{names.setting("rounds", new.get("rounds"))} cannot extend or reuse: the '
    f'learning-rate decay (to {n("client_lr_min")} at the last round) and the mask '
    f'schedule ({n("delta_t")}, {n("t_end")}) of every round follow {n("rounds")}, so a run '
    f'of another length is a new run; choose another {n("root_dir")}, or rerun with '
    f'{n("overwrite")} to replace it'
  )


def finished_summary(root_dir: str, rounds: int) -> Any:
  """The `summary.json` of a finished run of `rounds` rounds in `root_dir`, or None.

  A run is finished when its summary (written last) is readable and reports `rounds`
  completed rounds.
  """
  try:
    summary = read_json(os.path.join(root_dir, SUMMARY_FILE))
  except (OSError, ValueError):
    return None
  if not isinstance(summary, dict) or summary.get('rounds_completed') != rounds:
    return None
  return summary


def prepare_root_dir(
  root_dir: str,
  config: Mapping[str, Any],
  overwrite: bool,
  names: text.SettingNames = text.KEYWORDS,
) -> bool:
  """Makes `root_dir` ready for a run of `config`; returns whether an earlier run may be resumed.

  `check_root_dir` decides; unless resuming, the run entries are cleared (`clear_run`) and
  `config.json` is written.

  Args:
    root_dir: the run directory.
    config: JSON-serialisable flag values that determine the result.
    overwrite: start afresh in a directory written by another configuration.
    names: how the messages name the settings (see `check_root_dir`).

  Returns:
    True when `root_dir` holds a run of the same configuration (its checkpoints are resumed).

  Raises:
    RunDirError: see `check_root_dir`; also when the directory cannot be written.
  """
  if check_root_dir(root_dir, config, overwrite, names=names):
    return True
  try:
    os.makedirs(root_dir, exist_ok=True)
    clear_run(root_dir)
    write_json(os.path.join(root_dir, CONFIG_FILE), json.loads(json.dumps(dict(config))))
  except OSError as e:
    raise RunDirError(
      f'{names.setting("root_dir", root_dir)}: cannot be written ({e.strerror or e})'
    ) from None
  return False


def disk_full_message(
  error: BaseException, root_dir: str, names: text.SettingNames = text.KEYWORDS
) -> Optional[str]:
  """The one-line message for `error` when it is a full disk (or quota) while writing the run.

  `names` says how the message names `root_dir` (see `check_root_dir`).

  Returns None for any other error. Every checkpoint write is atomic, so the rounds saved
  before the failure are intact and the same command resumes after them.
  """
  full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
  full = full or 'No space left on device' in str(error)
  if not full:
    return None
  where = getattr(error, 'path', None) or getattr(error, 'filename', None) or root_dir
  return (
    f'disk full while writing {text.one_line(os.fsdecode(where))}; the rounds saved '
    'before it are intact: free space on that disk (or copy '
    f'{names.setting("root_dir", text.one_line(root_dir))} to a larger one and point '
    f'{names.name("root_dir")} at the copy), then rerun the same command to resume'
  )


def state_manager(root_dir: str):
  """The run's `tff_programs.checkpoints.NpzProgramStateManager` (versions are round numbers).

  Temporary files of a save that was killed midway are removed first. Checkpoint directories
  `program_state_<t>/` (TFF's `FileProgramStateManager` SavedModel format) are refused, not
  loaded: loading a SavedModel runs the graph it holds.

  Raises:
    RunDirError: when the checkpoint directory holds SavedModel checkpoints.
  """
  from tff_programs import checkpoints  # pylint: disable=import-outside-toplevel

  directory = os.path.join(root_dir, CHECKPOINT_DIR)
  if os.path.isdir(directory):
    saved_models = sorted(
      n for n in os.listdir(directory) if re.fullmatch(r'program_state_\d+(_temp\d+)?', n)
    )
    if saved_models:
      raise RunDirError(
        f'{os.path.join(directory, saved_models[-1])} is a SavedModel checkpoint, '
        'which is not loaded (loading one runs the graph it holds); rerun with --overwrite '
        'to start afresh, or move it away'
      )
  manager = checkpoints.NpzProgramStateManager(directory, keep=_KEEP_CHECKPOINTS)
  manager.remove_temporary_files()
  return manager


class MetricsReleaser:
  """Releases each round's metrics to `metrics.csv` and TensorBoard via `tff.program` managers.

  The CSV manager removes rows with a key >= the released round first, so rows of rounds that
  were released but not checkpointed before an interruption are replaced on resume. Values that
  are NaN (for example test accuracy in a round without evaluation) are written to the CSV as
  `nan` and left out of TensorBoard.
  """

  def __init__(self, root_dir: str):
    import tensorflow_federated as tff  # pylint: disable=import-outside-toplevel

    self._csv = tff.program.CSVFileReleaseManager(
      os.path.join(root_dir, METRICS_FILE), key_fieldname='round'
    )
    self._tensorboard = tff.program.TensorBoardReleaseManager(
      os.path.join(root_dir, TENSORBOARD_DIR)
    )

  def release(self, metrics: Mapping[str, float], round_num: int) -> None:
    """Releases `metrics` (flat name -> number) as round `round_num`."""
    finite = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}

    async def _release():
      await self._csv.release(dict(metrics), round_num)
      await self._tensorboard.release(finite, round_num)

    asyncio.run(_release())


def mark_clientless_round(row: Dict[str, float]) -> Dict[str, float]:
  """Sets `train_loss` and `train_accuracy` of a round that used no client to NaN.

  Such a round trained nothing (every sampled client's update was rejected as non-finite, or
  was empty): it has no training loss, and a 0 would read as a perfect one.
  """
  if row.get('clients_used') == 0:
    row = dict(row, train_loss=float('nan'), train_accuracy=float('nan'))
  return row


class ClientlessRounds:
  """Follows rounds that used no client and says when several of them come in a row.

  Args:
    warn_after: how many such rounds in a row make a warning.
    names: how the warning names the client learning rate (see `check_root_dir`).
  """

  def __init__(self, warn_after: int = 3, names: text.SettingNames = text.KEYWORDS):
    self._warn_after = warn_after
    self._names = names
    self._first = None
    self._count = 0

  def record(self, round_num: int, clients_used: float) -> Optional[str]:
    """Takes a round's `clients_used`; returns a warning when a run of them is long enough."""
    if clients_used:
      self._first, self._count = None, 0
      return None
    if self._first is None:
      self._first = round_num
    self._count += 1
    if self._count != self._warn_after:
      return None
    return (
      f'rounds {self._first}..{round_num} used no client (every client update was '
      f'non-finite or empty, so the model did not change); a lower '
      f'{self._names.name("client_lr")} may help'
    )


def any_client_used(rows: Sequence[Mapping[str, float]]) -> bool:
  """Whether any round of `read_metrics`' rows used at least one client."""
  return any(r.get('clients_used', 0) > 0 for r in rows)


def read_metrics(root_dir: str) -> List[Dict[str, float]]:
  """Reads `metrics.csv` back as a list of rows (numbers as float, `round` as int)."""
  path = os.path.join(root_dir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      parsed = {}
      for k, v in row.items():
        try:
          parsed[k] = float(v)
        except (TypeError, ValueError):
          parsed[k] = float('nan')
      parsed['round'] = int(parsed['round'])
      rows.append(parsed)
  return rows


def pyplot():
  """matplotlib's `pyplot` on the file-only Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def plot_curves(rows: Sequence[Mapping[str, float]], path: str, title: str) -> str:
  """Plots test accuracy and train loss against round to `path` (PNG); returns `path`."""
  plt = pyplot()
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
  rounds = [r['round'] for r in rows]
  acc = [(r['round'], r.get('test_accuracy', float('nan'))) for r in rows]
  acc = [(t, a) for t, a in acc if not math.isnan(a)]
  if acc:
    ax_acc.plot([t for t, _ in acc], [a for _, a in acc], 'o-', label='test')
  train_acc = [r.get('train_accuracy', float('nan')) for r in rows]
  if any(not math.isnan(a) for a in train_acc):
    ax_acc.plot(rounds, train_acc, '-', alpha=0.6, label='train (clients)')
  ax_acc.set_xlabel('round')
  ax_acc.set_ylabel('accuracy')
  ax_acc.set_ylim(0, 1)
  ax_acc.legend()
  ax_acc.grid(alpha=0.3)
  ax_loss.plot(rounds, [r.get('train_loss', float('nan')) for r in rows], '-', label='train')
  test_loss = [(r['round'], r.get('test_loss', float('nan'))) for r in rows]
  test_loss = [(t, v) for t, v in test_loss if not math.isnan(v)]
  if test_loss:
    ax_loss.plot([t for t, _ in test_loss], [v for _, v in test_loss], 'o-', label='test')
  ax_loss.set_xlabel('round')
  ax_loss.set_ylabel('loss')
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, plt, path)


def plot_layer_density(
  names: Sequence[str], densities: Sequence[float], path: str, title: str
) -> str:
  """Bar chart of the final mask density of each prunable layer; returns `path`."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
  ax.bar(range(len(names)), densities)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=60, ha='right', fontsize=8)
  ax.set_ylabel('density (nonzeros / size)')
  ax.set_ylim(0, 1.05)
  ax.set_title(title)
  fig.tight_layout()
  return save_figure(fig, plt, path)


def plot_memory(
  parts: Mapping[str, float], bars: Mapping[str, float], path: str, title: str
) -> str:
  """Memory of one training step in MiB; returns `path`.

  Args:
    parts: analytic components (weights, cached activations, ...), drawn as one stacked bar.
    bars: single values drawn beside it (the analytic and the measured step peak).
    path: PNG file.
    title: plot title.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  labels = []
  if parts:
    bottom = 0.0
    for name, value in parts.items():
      mib = float(value) / 2**20
      ax.bar(0, mib, bottom=bottom, label=name.replace('_bytes', '').replace('_', ' '))
      bottom += mib
    labels.append('analytic parts')
  for name, value in bars.items():
    if value is None or math.isnan(float(value)):
      continue
    ax.bar(len(labels), float(value) / 2**20, color='grey' if 'measured' in name else 'tan')
    labels.append(name)
  ax.set_xticks(range(len(labels)))
  ax.set_xticklabels(labels, fontsize=8)
  ax.set_ylabel('MiB')
  ax.set_title(title, fontsize=10)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return save_figure(fig, plt, path)


def save_figure(fig, plt, path: str) -> str:
  """Writes `fig` to the PNG file `path` atomically (temporary file, rename), closes it;
  returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path
