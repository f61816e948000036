"""Checkpoints of a training program as plain tensors: saved atomically, loaded as data only.

`NpzProgramStateManager` is a `tff.program.ProgramStateManager` that writes each version of the
program state to `program_state_<version>.npz` in its directory: one array per leaf of the state
(`numpy.savez`) plus the leaves' paths. Loading reads the file with `numpy.load(...,
allow_pickle=False)`, so a checkpoint can only ever give arrays of numbers: no TensorFlow graph
is loaded or run and nothing is unpickled, whoever wrote the file. The arrays are then checked
against the structure the program expects (the same leaf paths, dtypes and shapes as its freshly
initialised state) before they replace it.

Writing is atomic: the file is written under a temporary name in the same directory, flushed to
disk (`fsync`), renamed, and the directory is flushed, so a checkpoint is either complete or
absent. A write that fails (a full disk, for example) removes its temporary file and raises
`CheckpointWriteError`, leaving the earlier checkpoints as they were. The newest `keep`
versions are kept.

`load_latest` checks the newest version and, when it is damaged (truncated, changed bytes: the
zip container's CRC-32 of every array detects them; missing arrays; another structure), reports
it through `on_damaged`, renames it to `program_state_<version>.npz.damaged` (kept for
inspection, no longer a version: the round is trained and saved again) and falls back to the
next older one. When no version is intact it
raises `CheckpointError` naming the damaged files.
"""

import errno
import os
import re
import tempfile
import zipfile
from typing import Any, Callable, List, Mapping, Optional, Tuple

import numpy as np
import tree

import tensorflow_federated as tff

_NAME = re.compile(r'program_state_(\d+)\.npz')
_TEMP = re.compile(r'\.program_state_\d+\.npz\.[A-Za-z0-9_]+\.tmp')
_PATHS_KEY = 'leaf_paths'
DAMAGED_SUFFIX = '.damaged'
_NPY_HEADER_MAX = 4096  # bytes of an .npy member before its data (magic, version, header)


class CheckpointError(Exception):
  """No usable checkpoint could be loaded (one-line message naming the files and why)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; nothing of it is left on disk.

  Attributes:
    path: the checkpoint file that was being written.
    disk_full: whether the write failed because the file system is full (ENOSPC, EDQUOT).
  """

  def __init__(self, path: str, cause: OSError):
    super().__init__(cause.errno, cause.strerror or str(cause))
    self.path = path
    self.disk_full = cause.errno in (errno.ENOSPC, errno.EDQUOT)


def _path_name(path: Tuple[Any, ...]) -> str:
  return '/'.join(str(p) for p in path)


def flatten(structure) -> Tuple[List[str], List[np.ndarray]]:
  """The leaf paths ('a/0/b') and leaves (as numpy arrays) of a nested program state."""
  paths, leaves = [], []
  for path, leaf in tree.flatten_with_path(structure):
    paths.append(_path_name(path))
    leaves.append(np.asarray(leaf))
  return paths, leaves


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` to the new file `path` (`numpy.savez`) and flushes it to disk."""
  with open(path, 'xb') as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class NpzProgramStateManager(tff.program.ProgramStateManager):
  """Saves and loads program state as `.npz` files of tensors (see the module docstring).

  Args:
    root_dir: the checkpoint directory (created on the first save).
    keep: how many of the newest versions to keep.
    write_file: `(path, arrays)` -> None, writes a new file; `write_npz` unless a test needs
      a writer that fails.
  """

  def __init__(
    self,
    root_dir: str,
    keep: int = 2,
    write_file: Callable[[str, Mapping[str, np.ndarray]], None] = write_npz,
  ):
    self._root_dir = root_dir
    self._keep = keep
    self._write_file = write_file

  def path(self, version: int) -> str:
    return os.path.join(self._root_dir, f'program_state_{version}.npz')

  def remove_temporary_files(self) -> List[str]:
    """Removes temporary files of saves that were killed midway; returns their names."""
    removed = []
    if os.path.isdir(self._root_dir):
      for name in sorted(os.listdir(self._root_dir)):
        if _TEMP.fullmatch(name):
          os.remove(os.path.join(self._root_dir, name))
          removed.append(name)
    return removed

  async def get_versions(self) -> Optional[List[int]]:
    if not os.path.isdir(self._root_dir):
      return None
    versions = sorted(
      int(m.group(1)) for m in map(_NAME.fullmatch, os.listdir(self._root_dir)) if m
    )
    return versions or None

  def read(self, version: int, structure):
    """Reads version `version` as `structure`; raises `CheckpointError` when it is unusable."""
    path = self.path(version)
    if not os.path.isfile(path):
      raise tff.program.ProgramStateNotFoundError(version=version)
    want_paths, want_leaves = flatten(structure)
    try:
      with np.load(path, allow_pickle=False) as data:
        if _PATHS_KEY not in data.files:
          raise CheckpointError(f'{path}: not a checkpoint of this program (no {_PATHS_KEY})')
        want_names = np.asarray(want_paths, dtype=np.str_)
        if data.zip.getinfo(_PATHS_KEY + '.npy').file_size > want_names.nbytes + _NPY_HEADER_MAX:
          raise CheckpointError(
            f"{path}: holds another structure than this run's program "
            'state (its tensor names are longer)'
          )
        paths = [str(p) for p in data[_PATHS_KEY]]
        if paths != want_paths:
          raise CheckpointError(
            f"{path}: holds another structure than this run's program "
            f'state ({len(paths)} tensors, {len(want_paths)} expected)'
          )
        leaves = []
        for i, (name, want) in enumerate(zip(want_paths, want_leaves)):
          key = f'leaf_{i:05d}'
          if key not in data.files:
            raise CheckpointError(f'{path}: tensor {name} is missing')
          # The size the member unpacks to is checked before it is read, so that a small
          # compressed file cannot make the reader allocate more than this run's state needs.
          if data.zip.getinfo(key + '.npy').file_size > want.nbytes + _NPY_HEADER_MAX:
            raise CheckpointError(
              f'{path}: tensor {name} is larger than this run needs '
              f'({want.dtype}{list(want.shape)})'
            )
          value = data[key]
          if value.dtype != want.dtype or value.shape != want.shape:
            raise CheckpointError(
              f'{path}: tensor {name} is {value.dtype}{list(value.shape)}, this run needs '
              f'{want.dtype}{list(want.shape)}'
            )
          leaves.append(value)
    except CheckpointError:
      raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f'{path}: damaged ({type(e).__name__}: {reason})') from None
    return tree.unflatten_as(structure, leaves)

  async def load(self, version: int, structure):
    return self.read(version, structure)

  async def load_latest(self, structure, on_damaged: Optional[Callable[[str], None]] = None):
    """The newest intact version and its number, or (None, 0) when there is none.

    Args:
      structure: the program state the run expects (freshly initialised).
      on_damaged: called with a one-line message for each damaged version passed over.

    Damaged versions newer than the one loaded are renamed (`DAMAGED_SUFFIX`); when none is
    intact, nothing is renamed.

    Raises:
      CheckpointError: when versions exist and none of them is intact.
    """
    versions = await self.get_versions()
    if not versions:
      return None, 0
    problems = []
    for version in reversed(versions):
      try:
        state = self.read(version, structure)
      except CheckpointError as e:
        problems.append((version, str(e)))
        continue
      for damaged, problem in problems:
        kept = self.path(damaged) + DAMAGED_SUFFIX
        os.replace(self.path(damaged), kept)
        if on_damaged is not None:
          on_damaged(f'{problem}; kept as {kept}')
      return state, version
    problems = [problem for _, problem in problems]
    raise CheckpointError(f'no intact checkpoint in {self._root_dir}: {"; ".join(problems)}')

  async def save(self, program_state, version: int) -> None:
    path = self.path(version)
    if os.path.exists(path):
      raise tff.program.ProgramStateExistsError(version=version, path=self._root_dir)
    paths, leaves = flatten(program_state)
    for name, leaf in zip(paths, leaves):
      if leaf.dtype == object:
        raise TypeError(f'program state tensor {name} is not numeric: {type(leaf)}')
    arrays = {f'leaf_{i:05d}': leaf for i, leaf in enumerate(leaves)}
    arrays[_PATHS_KEY] = np.asarray(paths, dtype=np.str_)
    os.makedirs(self._root_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
      prefix=f'.program_state_{version}.npz.', suffix='.tmp', dir=self._root_dir
    )
    os.close(fd)
    os.remove(tmp)  # `write_file` creates it anew
    try:
      self._write_file(tmp, arrays)
      os.replace(tmp, path)
      _fsync_dir(self._root_dir)
    except OSError as e:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise CheckpointWriteError(path, e) from None
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    for old in (await self.get_versions() or [])[: -self._keep]:
      os.remove(self.path(old))
