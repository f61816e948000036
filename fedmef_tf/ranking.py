"""Top-k selection by score with ties by flat index, shared by the mask updates.

The BaE marked set (`fedmef_tf.bae.marked_set`), the server's growth and the magnitude masks
of the baselines (`fedmef_tf.mask_updates`) each pick the `k` best-scored eligible positions
of one layer with `select_top`.
"""

import tensorflow as tf

__all__ = ['select_top']


def select_top(score, eligible, k):
  """0/1 float mask (shape of `score`) of the k largest `score` entries among `eligible` ones.

  Ties are broken by flat (row-major) index, lower index first (`tf.math.top_k` returns the
  lower index first among equal values).

  Args:
    score: float tensor, any shape.
    eligible: bool tensor, same shape.
    k: int scalar, number of positions to select; clipped to [0, count(eligible)].

  Returns:
    A float32 tensor of the shape of `score` with exactly min(k, count(eligible)) ones.
  """
  flat_score = tf.reshape(tf.cast(score, tf.float32), [-1])
  flat_eligible = tf.reshape(eligible, [-1])
  n = tf.size(flat_score)
  k = tf.cast(k, tf.int32)
  k = tf.clip_by_value(k, 0, tf.reduce_sum(tf.cast(flat_eligible, tf.int32)))
  lowest = tf.fill(tf.shape(flat_score), tf.constant(-float('inf'), tf.float32))
  masked_score = tf.where(flat_eligible, flat_score, lowest)
  _, indices = tf.math.top_k(masked_score, k=k, sorted=True)
  selected = tf.scatter_nd(
    tf.expand_dims(indices, 1), tf.ones_like(indices, dtype=tf.float32), tf.expand_dims(n, 0)
  )
  return tf.reshape(selected, tf.shape(score))
