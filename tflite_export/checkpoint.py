"""On-device checkpoints of a TFLite export as one float32 vector, from builtin ops only.

TF's `Save` / `Restore` ops exist in TFLite only as select-TF operators. A phone app that links
only the stock LiteRT runtime writes the checkpoint itself instead: the `save` signature hands
it every variable of the model and the learning rate packed into one float32 vector, and the
`restore` signature takes that vector back and assigns it.

What the app does:

* checkpoint: call `save()`, take its output `checkpoint` (float32 `[N]`) and write its raw
  bytes (`N * 4` bytes, little-endian IEEE float32, the tensor's own buffer) to a file;
* resume: read the file back into a float32 `[N]` buffer and call `restore(checkpoint=...)`;
  the interpreter's variables and learning rate are then exactly the saved ones.

`N` and the layout are fixed by the export (`checkpoint_layout` in the `metadata` signature:
`[name, offset, shape]` per entry, in order, the learning rate last): entry `name` occupies
`checkpoint[offset : offset + prod(shape)]`, row-major. A vector of another length is refused
by the interpreter (the input shape is static).

The packing is `RESHAPE` and `CONCATENATION`, the unpacking `STRIDED_SLICE` and `RESHAPE`, the
assignments `ASSIGN_VARIABLE`: all builtins. Every variable of an export is float32 (masks,
BaE marked sets and lambdas, BatchNorm statistics included), so values pass bitwise.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

__all__ = ['layout', 'checkpoint_size', 'pack', 'unpack', 'write_file', 'read_file']


def layout(
  names: Sequence[str], shapes: Sequence[Sequence[int]]
) -> List[Tuple[str, int, List[int]]]:
  """`(name, offset, shape)` of each entry in the checkpoint vector, in the given order.

  Args:
    names: entry names (the export's weight names, then the learning rate's).
    shapes: their static shapes.

  Returns:
    Offsets in float32 elements from the start of the vector.
  """
  out, offset = [], 0
  for name, shape in zip(names, shapes):
    shape = [int(d) for d in shape]
    out.append((str(name), offset, shape))
    offset += int(np.prod(shape, dtype=np.int64))
  return out


def checkpoint_size(entries: Sequence[Tuple[str, int, Sequence[int]]]) -> int:
  """Length N of the checkpoint vector of a `layout`."""
  if not entries:
    return 0
  _, offset, shape = entries[-1]
  return offset + int(np.prod(shape, dtype=np.int64))


def _check_float32(variables: Sequence[tf.Variable]) -> None:
  for v in variables:
    if v.dtype != tf.float32:
      raise ValueError(f'{v.name}: checkpoint entries must be float32, got {v.dtype.name}')


def pack(variables: Sequence[tf.Variable]) -> tf.Tensor:
  """float32 `[N]`: every variable's current value, flattened row-major, in order."""
  _check_float32(variables)
  return tf.concat([tf.reshape(tf.identity(v), [-1]) for v in variables], axis=0)


def unpack(checkpoint: tf.Tensor, variables: Sequence[tf.Variable]) -> List[tf.Tensor]:
  """The entries of a checkpoint vector, shaped like `variables` (see `pack`)."""
  _check_float32(variables)
  out, offset = [], 0
  for v in variables:
    size = int(v.shape.num_elements())
    out.append(tf.reshape(checkpoint[offset : offset + size], v.shape))
    offset += size
  return out


def write_file(path: str, checkpoint: np.ndarray) -> int:
  """Writes a `save` output as the app does (raw little-endian float32); returns the bytes."""
  data = np.ascontiguousarray(checkpoint, dtype='<f4')
  with open(path, 'wb') as f:
    f.write(data.tobytes())
  return data.nbytes


def read_file(path: str, size: int) -> np.ndarray:
  """Reads a checkpoint file written by `write_file` (or the app) as float32 `[size]`.

  Raises:
    ValueError: the file does not hold exactly `size` float32 values.
  """
  data = np.fromfile(path, dtype='<f4')
  if data.size != size:
    raise ValueError(
      f'{path}: checkpoint holds {data.size} float32 values, the export expects {size}'
    )
  return data.astype(np.float32)
