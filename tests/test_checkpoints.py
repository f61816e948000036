"""Tests of `tff_programs.checkpoints`: tensors-only program state, atomic, checked, fallback.

* a saved state loads back equal, in the structure asked for;
* a write that fails (a full disk, emulated by a writer that raises ENOSPC midway) leaves no
  temporary file and the earlier versions intact, and is reported as a full disk in one line;
* a damaged newest version (truncated, changed bytes, random bytes, a missing tensor) is
  reported and passed over for the one before; with none intact the error names the files;
* a version of another structure (other shapes, other tensors) is refused;
* security: a checkpoint holding a pickled object is refused without running it, and
  SavedModel checkpoint directories are refused, never loaded.
"""

import asyncio
import collections
import errno
import os

import numpy as np
import pytest

from tff_programs import checkpoints
from tff_programs import program_io

Pair = collections.namedtuple('Pair', ['trainable', 'non_trainable'])


def _state(scale=1.0):
  return {
    'round': np.int64(3),
    'process': collections.OrderedDict(
      weights=Pair(
        [np.full((2, 3), scale, np.float32), np.arange(4, dtype=np.float32)],
        [np.ones((3,), np.float32)],
      ),
      masks=[np.array([[1, 0], [0, 1]], np.float32)],
      step=np.int32(7),
    ),
    'totals': {'down_bytes': np.float64(10.0), 'up_bytes': np.float64(4.5)},
  }


def _assert_equal_states(a, b):
  import tree  # pylint: disable=import-outside-toplevel

  tree.assert_same_structure(a, b)
  for x, y in zip(tree.flatten(a), tree.flatten(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def _save(manager, state, version):
  asyncio.run(manager.save(state, version))


def test_round_trip_keeps_values_dtypes_and_structure_and_keeps_the_newest_two(tmp_path):
  manager = checkpoints.NpzProgramStateManager(str(tmp_path), keep=2)
  for version in (1, 2, 3):
    _save(manager, _state(scale=version), version)
  assert sorted(os.listdir(tmp_path)) == ['program_state_2.npz', 'program_state_3.npz']
  loaded, version = asyncio.run(manager.load_latest(_state(scale=0)))
  assert version == 3
  _assert_equal_states(loaded, _state(scale=3))
  assert isinstance(loaded['process']['weights'], Pair)


def test_disk_full_during_the_write_leaves_no_temporary_and_keeps_the_earlier_rounds(tmp_path):

  def fills_the_disk(path, arrays):
    with open(path, 'xb') as f:
      f.write(b'PK\x03\x04' + b'\0' * 1000)  # part of the file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  _save(checkpoints.NpzProgramStateManager(str(tmp_path)), _state(scale=1), 1)
  manager = checkpoints.NpzProgramStateManager(str(tmp_path), write_file=fills_the_disk)
  with pytest.raises(checkpoints.CheckpointWriteError) as caught:
    _save(manager, _state(scale=2), 2)
  assert caught.value.disk_full
  assert sorted(os.listdir(tmp_path)) == ['program_state_1.npz']  # no temporary file left
  loaded, version = asyncio.run(manager.load_latest(_state(scale=0)))
  assert version == 1
  _assert_equal_states(loaded, _state(scale=1))
  message = program_io.disk_full_message(caught.value, str(tmp_path.parent))
  assert message is not None and '\n' not in message
  assert message.startswith(f'disk full while writing {tmp_path}/program_state_2.npz')
  assert 'rerun the same command to resume' in message
  assert program_io.disk_full_message(OSError(errno.EACCES, 'denied'), str(tmp_path)) is None


def _damage_truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _damage_change_bytes(path):
  data = bytearray(path.read_bytes())
  for i in range(200, 250):  # inside the first tensor's data
    data[i] ^= 0x5A
  path.write_bytes(bytes(data))


def _damage_random(path):
  path.write_bytes(np.random.RandomState(0).bytes(path.stat().st_size))


def _damage_drop_tensor(path):
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files if k != 'leaf_00002'}
  os.remove(path)
  checkpoints.write_npz(str(path), arrays)


@pytest.mark.parametrize(
  'damage',
  [_damage_truncate, _damage_change_bytes, _damage_random, _damage_drop_tensor],
  ids=['truncated', 'changed_bytes', 'random_bytes', 'missing_tensor'],
)
def test_damaged_newest_version_is_reported_and_the_one_before_is_loaded(tmp_path, damage):
  manager = checkpoints.NpzProgramStateManager(str(tmp_path))
  _save(manager, _state(scale=1), 1)
  _save(manager, _state(scale=2), 2)
  damage(tmp_path / 'program_state_2.npz')
  reported = []
  loaded, version = asyncio.run(manager.load_latest(_state(scale=0), on_damaged=reported.append))
  assert version == 1
  _assert_equal_states(loaded, _state(scale=1))
  assert len(reported) == 1 and '\n' not in reported[0]
  assert reported[0].startswith(f'{tmp_path}/program_state_2.npz: ')
  assert reported[0].endswith(f'kept as {tmp_path}/program_state_2.npz.damaged')
  assert asyncio.run(manager.get_versions()) == [1]  # round 2 is saved again after retraining
  _save(manager, _state(scale=2), 2)


def test_no_intact_version_raises_naming_the_damaged_files(tmp_path):
  manager = checkpoints.NpzProgramStateManager(str(tmp_path))
  _save(manager, _state(), 1)
  _save(manager, _state(), 2)
  for version in (1, 2):
    _damage_truncate(tmp_path / f'program_state_{version}.npz')
  with pytest.raises(checkpoints.CheckpointError) as caught:
    asyncio.run(manager.load_latest(_state()))
  message = str(caught.value)
  assert 'program_state_1.npz' in message and 'program_state_2.npz' in message
  assert '\n' not in message
  # Nothing renamed: a rerun is refused the same way instead of starting afresh.
  assert sorted(os.listdir(tmp_path)) == ['program_state_1.npz', 'program_state_2.npz']


def test_a_checkpoint_of_another_structure_is_refused(tmp_path):
  manager = checkpoints.NpzProgramStateManager(str(tmp_path))
  _save(manager, _state(), 1)
  other_shape = _state()
  other_shape['process']['masks'] = [np.ones((3, 3), np.float32)]
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r'masks/0 is float32\[2, 2\], this run '
    r'needs float32\[3, 3\]',
  ):
    manager.read(1, other_shape)
  more_tensors = _state()
  more_tensors['process']['extra'] = np.zeros(2, np.float32)
  with pytest.raises(checkpoints.CheckpointError, match='another structure'):
    manager.read(1, more_tensors)


def test_security_a_pickled_object_in_a_checkpoint_is_refused_and_never_run(tmp_path):
  marker = tmp_path / 'pwned'

  class Planted:  # unpickling it would create the marker file
    def __reduce__(self):
      return (open, (str(marker), 'w'))

  manager = checkpoints.NpzProgramStateManager(str(tmp_path / 'checkpoints'))
  _save(manager, _state(), 1)
  with np.load(tmp_path / 'checkpoints' / 'program_state_1.npz') as data:
    arrays = {k: data[k] for k in data.files}
  arrays['leaf_00000'] = np.array([Planted()], dtype=object)
  np.savez(tmp_path / 'checkpoints' / 'program_state_2.npz', **arrays)  # pickles the object
  reported = []
  loaded, version = asyncio.run(manager.load_latest(_state(), on_damaged=reported.append))
  assert version == 1 and loaded is not None
  assert len(reported) == 1 and 'program_state_2.npz' in reported[0]
  assert not marker.exists()


def test_security_an_oversized_tensor_is_refused_before_it_is_unpacked(tmp_path):
  manager = checkpoints.NpzProgramStateManager(str(tmp_path))
  _save(manager, _state(), 1)
  with np.load(tmp_path / 'program_state_1.npz') as data:
    arrays = {k: data[k] for k in data.files}
  arrays['leaf_00001'] = np.zeros((2**20,), np.float32)  # 4 MB of zeros, packed small
  np.savez_compressed(tmp_path / 'program_state_2.npz', **arrays)
  assert (tmp_path / 'program_state_2.npz').stat().st_size < 2**16
  with pytest.raises(checkpoints.CheckpointError, match='larger than this run needs'):
    manager.read(2, _state())


def test_security_saved_model_checkpoints_are_refused_not_loaded(tmp_path):
  saved_model = tmp_path / 'checkpoints' / 'program_state_4'
  saved_model.mkdir(parents=True)
  (saved_model / 'saved_model.pb').write_bytes(b'a graph that would run on load')
  with pytest.raises(
    program_io.RunDirError, match='is a SavedModel checkpoint, which is not loaded'
  ):
    program_io.state_manager(str(tmp_path))


def test_a_state_that_is_not_numeric_is_not_saved(tmp_path):
  manager = checkpoints.NpzProgramStateManager(str(tmp_path))
  with pytest.raises(TypeError, match='not numeric'):
    _save(manager, {'a': np.array([object()], dtype=object)}, 1)
  assert os.listdir(tmp_path) == []
