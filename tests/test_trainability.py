"""Signal propagation and trainability of the FedMef networks on real images and on noise.

Real images: scikit-learn's handwritten digits written in CIFAR-10's binary layout
(`fedmef_tf.digits`) and read back by the project's CIFAR-10 loader; noise: uniform pixels.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from benchmarks import trainability  # pylint: disable=g-import-not-at-top
from fedmef_tf import data  # pylint: disable=g-import-not-at-top
from fedmef_tf import digits
from fedmef_tf import model_io
from fedmef_tf import models
from tff_programs import cli

#: Band of every block output's standard deviation at initialisation (unit-variance design:
#: a stream of std 1 to sqrt(1 + alpha^2 + ...), ReLU outputs of std 0.58).
BLOCK_STD_BAND = (0.25, 2.5)


@pytest.fixture(scope='module')
def image_sets():
  sets = trainability.image_sets(seed=0)
  stats = {k: data.channel_stats(v[0]) for k, v in sets.items()}
  return sets, stats


def test_digits_are_written_in_the_cifar10_layout_and_read_by_its_loader(tmp_path):
  digits.write_cifar10_layout(str(tmp_path), seed=0)
  names = sorted(os.listdir(tmp_path))
  assert names == sorted(list(data.CIFAR10_TRAIN_FILES) + [data.CIFAR10_TEST_FILE])
  for name in names:
    assert (tmp_path / name).stat().st_size % data.CIFAR10_RECORD_BYTES == 0
  ds = data.load_cifar10(str(tmp_path))
  assert ds.train_images.shape[1:] == (32, 32, 3) and ds.train_images.dtype == np.uint8
  assert len(ds.train_labels) + len(ds.test_labels) == 1797
  assert np.bincount(ds.test_labels).tolist() == [digits.TEST_PER_CLASS] * 10
  # Grey images: the three planes are equal; ink is bright on a dark background.
  assert np.array_equal(ds.train_images[..., 0], ds.train_images[..., 2])
  assert ds.train_images.max() == 255 and np.percentile(ds.train_images, 25) == 0


def test_channel_stats_match_numpy_and_floor_a_constant_channel():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(50, 6, 7, 3), dtype=np.uint8)
  images[..., 2] = 17
  mean, std = data.channel_stats(images, chunk=7)
  x = images.astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(std[:2], x.std(axis=(0, 1, 2))[:2], rtol=1e-12)
  assert std[2] == pytest.approx(1.0 / 255.0)
  with pytest.raises(ValueError):
    data.channel_stats(np.zeros((0, 4, 4, 3), np.uint8))


def test_normalisation_layer_maps_the_training_split_to_zero_mean_unit_std(image_sets):
  sets, stats = image_sets
  model = trainability.build('cnn', 'fedmef', stats['digits'])
  norm = model.get_layer('input_norm')
  assert not norm.weights  # constants, not variables: nothing for TFF to average
  out = norm(sets['digits'][0][:500].astype(np.float32) / 255.0).numpy()
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=0.1)
  np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=0.1)
  with pytest.raises(ValueError):
    models.build_model('cnn', 'fedmef', input_mean=[0.5] * 3)
  with pytest.raises(ValueError):
    models.build_model('cnn', 'fedmef', input_mean=[0.5] * 3, input_std=[0.0, 1.0, 1.0])


@pytest.mark.parametrize('name', models.MODEL_NAMES)
@pytest.mark.parametrize('which', ['digits', 'noise'])
def test_fedmef_block_outputs_keep_a_known_scale_at_initialisation(image_sets, name, which):
  sets, stats = image_sets
  rows = trainability.block_scales(name, 'fedmef', sets[which][0], stats[which])
  blocks = [r for r in rows if r[0] != 'classifier']
  assert len(blocks) >= 4
  stds = np.array([s for _, _, s in blocks])
  lo, hi = BLOCK_STD_BAND
  assert np.all((stds >= lo) & (stds <= hi)), dict((n, round(s, 3)) for n, _, s in blocks)
  # Neither vanishing nor exploding with depth.
  assert 1 / 3 <= stds[-1] / stds[0] <= 3


@pytest.mark.parametrize('name,steps', [('cnn', 30), ('resnet18', 12), ('mobilenet_v2', 16)])
def test_fedmef_sgd_at_the_papers_rate_and_a_phones_batch_is_finite_and_falls(
  image_sets, name, steps
):
  sets, stats = image_sets
  images, labels = sets['digits']
  cell = trainability.run_cell(
    name, 'fedmef', images, labels, stats['digits'], batch_size=8, learning_rate=0.1, steps=steps
  )
  losses = np.array(cell['losses'])
  assert len(losses) == steps and np.all(np.isfinite(losses)), losses
  assert not cell['diverged'], losses
  third = steps // 3
  assert losses[-third:].mean() < losses[:third].mean(), losses


def test_a_saved_model_keeps_its_normalisation(tmp_path, image_sets):
  _, stats = image_sets
  model = trainability.build('cnn', 'fedmef', stats['digits'])
  x = np.random.default_rng(1).random((4, 32, 32, 3)).astype(np.float32)
  config = {
    'model': 'cnn',
    'variant': 'fedmef',
    'num_classes': 10,
    'input_shape': [32, 32, 3],
    'gamma': 0.7,
    'input_mean': stats['digits'][0],
    'input_std': stats['digits'][1],
  }
  model_io.save_model(model, config, str(tmp_path / 'm'))
  loaded, _ = model_io.load_model(str(tmp_path / 'm'))
  np.testing.assert_array_equal(loaded(x, training=False).numpy(), model(x, training=False).numpy())


def test_summary_lines_flag_a_fedmef_only_divergence_and_the_loss_ratio():
  def cell(variant, diverged, last, lr=0.1, batch=64):
    return dict(
      model='cnn', variant=variant, data='digits', batch=batch, lr=lr, diverged=diverged, last=last
    )

  cells = [
    cell('fedmef', False, 1.0),
    cell('baseline', False, 1.0),
    cell('fedmef', True, float('nan'), lr=0.2),
    cell('baseline', False, 1.2, lr=0.2),
    cell('fedmef', True, float('nan'), batch=8),
    cell('baseline', True, float('nan'), batch=8),
  ]
  lines = trainability.summary_lines(cells, ['cnn'])
  assert lines[0].endswith('NOT met: cnn digits b64 lr0.2')
  assert '1.00x' in lines[1] and lines[1].endswith('met)')
  lines = trainability.summary_lines(
    [cell('fedmef', False, 1.5), cell('baseline', False, 1.0)], ['cnn']
  )
  assert lines[0].endswith(': met') and '1.50x' in lines[1] and 'NOT met' in lines[1]


def test_combine_seeds_takes_mean_spread_and_any_divergence():
  a = dict(losses=[2.0, 1.0], diverged=False, last=1.0)
  b = dict(losses=[2.0, 1.5], diverged=False, last=2.0)
  c = dict(losses=[2.0, 9.0], diverged=True, last=4.0)
  two = trainability.combine_seeds([a, b])
  assert two['last'] == 1.5 and not two['diverged']
  assert two['last_sd'] == pytest.approx(np.sqrt(0.5))  # sample sd of 1 and 2
  assert two['lasts'] == [1.0, 2.0] and two['losses'] == [[2.0, 1.0], [2.0, 1.5]]
  three = trainability.combine_seeds([a, b, c])
  assert three['diverged'] and three['last'] == pytest.approx(7.0 / 3.0)
  one = trainability.combine_seeds([a])
  assert one['last'] == 1.0 and one['last_sd'] == 0.0
  nan = trainability.combine_seeds(
    [a, dict(losses=[2.0, float('nan')], diverged=True, last=float('nan'))]
  )
  assert nan['diverged'] and np.isnan(nan['last'])


def test_summary_lines_give_the_ratio_of_means_and_each_seeds_ratio():
  def cell(variant, lasts):
    combined = trainability.combine_seeds(
      [dict(losses=[1.0], diverged=False, last=x) for x in lasts]
    )
    combined.update(model='resnet18', variant=variant, data='digits', batch=64, lr=0.1)
    return combined

  lines = trainability.summary_lines(
    [cell('fedmef', [0.2, 0.3]), cell('baseline', [0.1, 0.3])], ['resnet18']
  )
  assert '1.25x' in lines[1]  # 0.25 / 0.2, the ratio of the means
  assert 'per seed 2.00x, 1.00x' in lines[1] and 'NOT met' in lines[1]


def test_seeds_flag_must_be_distinct_non_negative_integers():
  base = dict(models=['cnn'], data=['digits'], steps=40, batch_sizes=['8'], learning_rates=['0.1'])
  trainability.validate(dict(base, seeds=['0', '1', '2']))
  for bad in (['-1'], ['0', '0'], ['x'], []):
    with pytest.raises(cli.UsageError, match='--seeds'):
      trainability.validate(dict(base, seeds=bad))
