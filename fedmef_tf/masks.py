"""Sparsity masks of the prunable layers: ERK layer densities, random initial masks, density.

FedMef (Huang et al., CVPR 2024, arXiv 2403.14737) trains a sparse model from the first round.
Every Conv2D / DepthwiseConv2D / Dense kernel is prunable (stem and classifier included) and is
held by a `fedmef_tf.sparse_layers.MaskedLayer`; `prunable_layers` (of `sparse_layers`,
re-exported here) finds those layers in a model. This module decides how dense each one is
(Erdős–Rényi-Kernel, ERK), draws the initial random masks and reports density. It only reads and
writes the layers' `mask` / `kernel` variables through the layer API (`MaskedLayer.set_mask`),
so it knows nothing about how a layer uses its mask.

Layer index `l` everywhere in the project is the position in `prunable_layers(model)`.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from fedmef_tf.sparse_layers import prunable_layers

__all__ = [
  'prunable_layers',
  'erk_densities',
  'random_masks',
  'init_sparse',
  'global_density',
  'layer_nnz',
  'layer_sizes',
  'masks_of',
  'density_summary',
]

Shape = Tuple[int, ...]


def layer_sizes(model: tf.keras.layers.Layer) -> List[int]:
  """Number of kernel entries n_l of each prunable layer (dense count), in layer order."""
  return [int(np.prod(layer.kernel.shape)) for layer in prunable_layers(model)]


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> List[float]:
  """Erdős–Rényi-Kernel (ERK) densities of a list of kernels at a global density.

  density_l = min(1, eps * sum(shape_l) / prod(shape_l)), with eps chosen so that
  sum_l density_l * n_l == density * sum_l n_l exactly (n_l = prod(shape_l)). Layers whose
  ERK density would exceed 1 are made dense, and eps is solved again for the remaining layers,
  until no layer exceeds 1 (as in RigL's `sparse_utils.get_sparsities`).

  Args:
      shapes: kernel shapes, e.g. `(kh, kw, c_in, c_out)` for Conv2D, `(kh, kw, c_in, mult)`
          for DepthwiseConv2D, `(d_in, d_out)` for Dense. Every dim must be >= 1.
      density: global target density in (0, 1] (share of kernel entries that are nonzero).

  Returns:
      A list of per-layer densities in (0, 1], same order as `shapes`.

  Raises:
      ValueError: empty `shapes`, a non-positive dim, or `density` outside (0, 1].
  """
  if not shapes:
    raise ValueError('erk_densities needs at least one shape')
  if not 0.0 < float(density) <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density}')
  shapes = [tuple(int(d) for d in s) for s in shapes]
  for s in shapes:
    if not s or min(s) < 1:
      raise ValueError(f'invalid kernel shape {s}')
  if float(density) == 1.0:
    return [1.0] * len(shapes)
  sizes = np.array([float(np.prod(s)) for s in shapes])
  raw = np.array([float(sum(s)) / float(np.prod(s)) for s in shapes])
  target = float(density) * float(sizes.sum())
  dense = np.zeros(len(shapes), dtype=bool)
  eps = 0.0
  while not dense.all():
    budget = target - sizes[dense].sum()
    eps = budget / (sizes * raw)[~dense].sum()
    new_dense = (~dense) & (eps * raw > 1.0)
    if not new_dense.any():
      break
    dense |= new_dense
  out = np.where(dense, 1.0, np.minimum(1.0, eps * raw))
  return [float(d) for d in out]


def _count(density: float, size: int) -> int:
  """round(density * size), halves rounded up (not banker's rounding), clipped to [0, size]."""
  return int(min(size, max(0, math.floor(density * size + 0.5))))


def random_masks(
  shapes: Sequence[Sequence[int]], densities: Sequence[float], seed: int
) -> List[np.ndarray]:
  """Random 0/1 masks with exactly round(d_l * n_l) ones per layer.

  The positions of the ones are a uniformly random subset drawn from a NumPy generator seeded
  with `(seed, l)`, so a layer's mask depends only on the seed, its index and its size.
  A layer whose count rounds to 0 gets an all-zero mask (the spec's exact count is kept).

  Args:
      shapes: kernel shapes, one per layer.
      densities: density per layer in [0, 1], same length as `shapes`.
      seed: integer seed.

  Returns:
      A list of float32 arrays of the given shapes, values 0.0/1.0.

  Raises:
      ValueError: lengths differ or a density is outside [0, 1].
  """
  if len(shapes) != len(densities):
    raise ValueError(f'{len(shapes)} shapes but {len(densities)} densities')
  masks = []
  for l, (shape, d) in enumerate(zip(shapes, densities)):
    if not 0.0 <= float(d) <= 1.0:
      raise ValueError(f'density of layer {l} must be in [0, 1], got {d}')
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape))
    k = _count(float(d), size)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, l])
    flat = np.zeros(size, dtype=np.float32)
    flat[rng.choice(size, size=k, replace=False)] = 1.0
    masks.append(flat.reshape(shape))
  return masks


def init_sparse(model: tf.keras.layers.Layer, density: float, seed: int) -> List[np.ndarray]:
  """Gives a model its initial sparse state: ERK densities, random masks, masked kernels zeroed.

  Also clears the BaE marked set and lambda. With `density == 1` every mask is all ones.

  Args:
      model: a built model containing `MaskedLayer`s.
      density: global density of prunable kernels in (0, 1].
      seed: integer seed of the random masks.

  Returns:
      The masks that were set (float32 arrays, layer order).

  Raises:
      ValueError: the model has no prunable layer, or `density` is outside (0, 1].
  """
  layers = prunable_layers(model)
  if not layers:
    raise ValueError('model has no prunable (masked) layer')
  shapes = [tuple(layer.kernel.shape) for layer in layers]
  masks = random_masks(shapes, erk_densities(shapes, density), seed)
  for layer, mask in zip(layers, masks):
    layer.set_mask(mask)
    layer.set_bae(None, 0.0)
  return masks


def global_density(model: tf.keras.layers.Layer) -> float:
  """Share of prunable kernel entries that are active: sum_l nnz(mask_l) / sum_l n_l.

  Counts mask ones, not kernel nonzeros (a just-grown weight is active but still 0.0).
  """
  layers = prunable_layers(model)
  total = sum(int(np.prod(layer.mask.shape)) for layer in layers)
  if total == 0:
    return 1.0
  return float(sum(layer_nnz(model))) / float(total)


def layer_nnz(model: tf.keras.layers.Layer) -> List[int]:
  """Number of active entries (mask ones) of each prunable layer, in layer order (eager only)."""
  return [int(np.count_nonzero(layer.mask.numpy())) for layer in prunable_layers(model)]


def masks_of(model: tf.keras.layers.Layer) -> List[np.ndarray]:
  """Current masks of the prunable layers as float32 arrays, in layer order."""
  return [layer.mask.numpy() for layer in prunable_layers(model)]


def density_summary(model: tf.keras.layers.Layer) -> List[Tuple[str, Shape, int, float]]:
  """(name, kernel shape, nnz, density) per prunable layer, for logs."""
  out = []
  for layer, nnz in zip(prunable_layers(model), layer_nnz(model)):
    size = int(np.prod(layer.kernel.shape))
    out.append((layer.name, tuple(layer.kernel.shape), nnz, nnz / size))
  return out
