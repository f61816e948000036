"""The training loss of every fedmef-tf model: softmax cross-entropy on logits.

The models of `fedmef_tf.models` output logits (no softmax layer); clients, the evaluation of a
training run and the memory measurement all compute the loss here, so they train and report the
same quantity.
"""

import tensorflow as tf


def example_losses(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Cross-entropy of each example: `-log softmax(logits)[label]`.

  Args:
    labels: [B] integer class indices.
    logits: [B, classes] float logits.

  Returns:
    [B] float losses (nats).
  """
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def mean_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Mean of `example_losses` over the batch: the scalar a training step differentiates."""
  return tf.reduce_mean(example_losses(labels, logits))
