"""Specification tests of fedmef_tf.data (loaders, synthetic data, partitions, pipelines) and
tff_programs.client_data (the ClientData wrapper).

Every loader is run on small files written here in the official format, and on broken copies of
them, which must raise `DataError` with a one-line message naming the file.
"""

import os
import subprocess
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import data

# ------------------------------------------------------------------------------------------------
# Writers of the official formats.


def _cifar_records(n, num_label_bytes, seed):
  """Returns (bytes, images NHWC, labels) of n CIFAR binary records."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
  coarse = rng.integers(0, 20, size=n, dtype=np.uint8)
  fine = rng.integers(0, 100 if num_label_bytes == 2 else 10, size=n, dtype=np.uint8)
  chw = images.transpose(0, 3, 1, 2).reshape(n, -1)
  labels = [coarse[:, None], fine[:, None]] if num_label_bytes == 2 else [fine[:, None]]
  raw = np.concatenate(labels + [chw], axis=1)
  return raw.tobytes(), images, fine.astype(np.int32)


def _write_cifar10(d, n_per_file=3):
  os.makedirs(d, exist_ok=True)
  xs, ys = [], []
  for i, name in enumerate(data.CIFAR10_TRAIN_FILES + (data.CIFAR10_TEST_FILE,)):
    raw, x, y = _cifar_records(n_per_file, 1, i)
    with open(os.path.join(d, name), 'wb') as f:
      f.write(raw)
    xs.append(x)
    ys.append(y)
  return xs, ys


def _write_cifar100(d):
  os.makedirs(d, exist_ok=True)
  out = []
  for i, (name, n) in enumerate([('train.bin', 5), ('test.bin', 2)]):
    raw, x, y = _cifar_records(n, 2, 10 + i)
    with open(os.path.join(d, name), 'wb') as f:
      f.write(raw)
    out.append((x, y))
  return out


def _write_image(path, image, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  enc = tf.io.encode_png(image) if fmt == 'png' else tf.io.encode_jpeg(image, quality=100)
  tf.io.write_file(path, enc)


def _write_cinic(d, per_class=1):
  rng = np.random.default_rng(3)
  images = {}
  for split in ('train', 'valid', 'test'):
    for cls in data.CINIC10_CLASSES:
      for i in range(per_class):
        img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        path = os.path.join(d, split, cls, f'img{i}.png')
        _write_image(path, img, 'png')
        images[path] = img
  return images


def _write_tiny(d, wnids=('n01', 'n02'), per_class=2):
  rng = np.random.default_rng(4)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'wnids.txt'), 'w') as f:
    f.write('\n'.join(wnids) + '\n')
  for w in wnids:
    for i in range(per_class):
      img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
      _write_image(os.path.join(d, 'train', w, 'images', f'{w}_{i}.JPEG'), img, 'jpeg')
  lines = []
  for i, w in enumerate(list(wnids) * 2):
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    _write_image(os.path.join(d, 'val', 'images', f'val_{i}.JPEG'), img, 'jpeg')
    lines.append(f'val_{i}.JPEG\t{w}\t0\t0\t63\t63')
  with open(os.path.join(d, 'val', 'val_annotations.txt'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _one_line_error(excinfo, *fragments):
  msg = str(excinfo.value)
  assert '\n' not in msg, msg
  for frag in fragments:
    assert frag in msg, (frag, msg)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 binary.


def test_cifar10_reads_records_as_nhwc_uint8(tmp_path):
  d = str(tmp_path / 'cifar-10-batches-bin')
  xs, ys = _write_cifar10(d)
  for where in (d, str(tmp_path)):  # the batches folder itself, or its parent
    ds = data.load_cifar10(where)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_images, np.concatenate(xs[:5]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate(ys[:5]))
    np.testing.assert_array_equal(ds.test_images, xs[5])
    np.testing.assert_array_equal(ds.test_labels, ys[5])
    assert ds.num_classes == 10 and ds.input_shape == (32, 32, 3)


def test_cifar100_uses_fine_label(tmp_path):
  (trx, try_), (tex, tey) = _write_cifar100(str(tmp_path))
  ds = data.load_cifar100(str(tmp_path))
  np.testing.assert_array_equal(ds.train_images, trx)
  np.testing.assert_array_equal(ds.train_labels, try_)
  np.testing.assert_array_equal(ds.test_labels, tey)
  assert ds.num_classes == 100


def test_cifar10_truncated_file_is_one_line_error(tmp_path):
  _write_cifar10(str(tmp_path))
  path = tmp_path / 'data_batch_3.bin'
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(data.DataError) as e:
    data.load_cifar10(str(tmp_path))
  _one_line_error(e, 'data_batch_3.bin', 'wrong size', '3073')


def test_cifar100_wrong_record_size_is_error(tmp_path):
  _write_cifar100(str(tmp_path))
  # A CIFAR-10 style file (3073-byte records) is not a multiple of 3074 bytes.
  raw, _, _ = _cifar_records(4, 1, 0)
  (tmp_path / 'test.bin').write_bytes(raw)
  with pytest.raises(data.DataError) as e:
    data.load_cifar100(str(tmp_path))
  _one_line_error(e, 'test.bin', 'wrong size')


def test_cifar_empty_file_is_error(tmp_path):
  _write_cifar10(str(tmp_path))
  (tmp_path / 'test_batch.bin').write_bytes(b'')
  with pytest.raises(data.DataError) as e:
    data.load_cifar10(str(tmp_path))
  _one_line_error(e, 'test_batch.bin', 'wrong size')


def test_cifar10_bad_label_is_error(tmp_path):
  _write_cifar10(str(tmp_path))
  path = tmp_path / 'data_batch_1.bin'
  raw = bytearray(path.read_bytes())
  raw[0] = 42
  path.write_bytes(bytes(raw))
  with pytest.raises(data.DataError) as e:
    data.load_cifar10(str(tmp_path))
  _one_line_error(e, 'data_batch_1.bin', 'label 42')


@pytest.mark.parametrize('missing', ['data_batch_5.bin', 'test_batch.bin'])
def test_cifar10_missing_file_is_error(tmp_path, missing):
  _write_cifar10(str(tmp_path))
  os.remove(tmp_path / missing)
  with pytest.raises(data.DataError) as e:
    data.load_cifar10(str(tmp_path))
  _one_line_error(e, missing, 'missing')


@pytest.mark.parametrize(
  'loader', [data.load_cifar10, data.load_cifar100, data.load_cinic10, data.load_tinyimagenet]
)
def test_missing_directory_is_error(tmp_path, loader):
  where = str(tmp_path / 'nope')
  with pytest.raises(data.DataError) as e:
    loader(where)
  _one_line_error(e, where, 'missing')


# ------------------------------------------------------------------------------------------------
# CINIC-10 and TinyImageNet folders.


def test_cinic10_reads_folders(tmp_path):
  written = _write_cinic(str(tmp_path))
  ds = data.load_cinic10(str(tmp_path))
  assert ds.train_images.shape == (10, 32, 32, 3) and ds.test_images.shape == (10, 32, 32, 3)
  np.testing.assert_array_equal(ds.train_labels, np.arange(10))
  first = os.path.join(str(tmp_path), 'test', 'airplane', 'img0.png')
  np.testing.assert_array_equal(ds.test_images[0], written[first])


def test_cinic10_corrupt_png_is_error(tmp_path):
  _write_cinic(str(tmp_path))
  bad = tmp_path / 'test' / 'horse' / 'img0.png'
  bad.write_bytes(bad.read_bytes()[:20])
  with pytest.raises(data.DataError) as e:
    data.load_cinic10(str(tmp_path))
  _one_line_error(e, str(bad), 'unreadable image')


def test_cinic10_wrong_image_size_is_error(tmp_path):
  _write_cinic(str(tmp_path))
  bad = os.path.join(str(tmp_path), 'train', 'cat', 'img0.png')
  _write_image(bad, np.zeros((16, 32, 3), np.uint8), 'png')
  with pytest.raises(data.DataError) as e:
    data.load_cinic10(str(tmp_path))
  _one_line_error(e, bad, 'shape')


def test_cinic10_missing_class_folder_is_error(tmp_path):
  _write_cinic(str(tmp_path))
  folder = tmp_path / 'train' / 'ship'
  for f in folder.iterdir():
    f.unlink()
  folder.rmdir()
  with pytest.raises(data.DataError) as e:
    data.load_cinic10(str(tmp_path))
  _one_line_error(e, str(folder), 'missing')


def test_tinyimagenet_reads_folders(tmp_path):
  root = tmp_path / 'tiny-imagenet-200'
  _write_tiny(str(root))
  for where in (root, tmp_path):
    ds = data.load_tinyimagenet(str(where))
    assert ds.num_classes == 2 and ds.input_shape == (64, 64, 3)
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 1, 0, 1])


def test_tinyimagenet_grey_jpeg_becomes_rgb(tmp_path):
  _write_tiny(str(tmp_path))
  grey = np.full((64, 64, 1), 77, np.uint8)
  tf.io.write_file(
    str(tmp_path / 'train' / 'n01' / 'images' / 'n01_0.JPEG'), tf.io.encode_jpeg(grey, quality=100)
  )
  ds = data.load_tinyimagenet(str(tmp_path))
  assert ds.train_images[0].shape == (64, 64, 3)
  assert abs(int(ds.train_images[0].mean()) - 77) <= 1


def test_tinyimagenet_corrupt_jpeg_is_error(tmp_path):
  _write_tiny(str(tmp_path))
  bad = tmp_path / 'val' / 'images' / 'val_1.JPEG'
  bad.write_bytes(b'not a jpeg at all')
  with pytest.raises(data.DataError) as e:
    data.load_tinyimagenet(str(tmp_path))
  _one_line_error(e, str(bad), 'unreadable image')


def test_tinyimagenet_unknown_wnid_and_missing_annotations(tmp_path):
  _write_tiny(str(tmp_path))
  ann = tmp_path / 'val' / 'val_annotations.txt'
  ann.write_text('val_0.JPEG\tn99\t0\t0\t1\t1\n')
  with pytest.raises(data.DataError) as e:
    data.load_tinyimagenet(str(tmp_path))
  _one_line_error(e, 'val_annotations.txt', 'n99')
  ann.unlink()
  with pytest.raises(data.DataError) as e:
    data.load_tinyimagenet(str(tmp_path))
  _one_line_error(e, 'val_annotations.txt', 'missing')


def test_load_dataset_dispatch_and_bad_arguments(tmp_path):
  _write_cifar10(str(tmp_path))
  assert data.load_dataset('cifar10', str(tmp_path)).name == 'cifar10'
  assert data.load_dataset('synthetic', synthetic_train=20, synthetic_test=10).name == 'synthetic'
  with pytest.raises(ValueError):
    data.load_dataset('mnist', str(tmp_path))
  with pytest.raises(ValueError):
    data.load_dataset('cifar10', None)


# ------------------------------------------------------------------------------------------------
# Synthetic dataset.


def test_synthetic_is_deterministic_in_seed():
  a = data.synthetic(200, 50, seed=7)
  b = data.synthetic(200, 50, seed=7)
  c = data.synthetic(200, 50, seed=8)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert not np.array_equal(a.train_images, c.train_images)


def test_synthetic_shape_dtype_and_class_balance():
  ds = data.synthetic(1000, 200, seed=0)
  assert ds.train_images.shape == (1000, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [100] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [20] * 10)
  # Not degenerate: pixels spread over the range, train and test differ.
  assert 30 < ds.train_images.std() < 90
  assert not np.array_equal(ds.train_images[:200], ds.test_images)


def test_synthetic_is_learnable_but_not_trivial():
  """Nearest class mean (a linear baseline) beats chance but is far from perfect."""
  ds = data.synthetic(2000, 500, seed=0)
  x = ds.train_images.reshape(len(ds.train_images), -1).astype(np.float32) / 255
  xt = ds.test_images.reshape(len(ds.test_images), -1).astype(np.float32) / 255

  # Shifts are random, so use translation-invariant features: the power spectrum per channel.
  def feats(v):
    img = v.reshape(-1, 32, 32, 3)
    return np.abs(np.fft.fft2(img - img.mean(axis=(1, 2), keepdims=True), axes=(1, 2))).reshape(
      len(v), -1
    )

  f, ft = feats(x), feats(xt)
  means = np.stack([f[ds.train_labels == c].mean(0) for c in range(10)])
  pred = np.argmin(((ft[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  acc = (pred == ds.test_labels).mean()
  assert 0.2 < acc < 0.95, acc


def test_synthetic_bad_sizes():
  with pytest.raises(ValueError):
    data.synthetic(5, 100)
  with pytest.raises(ValueError):
    data.synthetic(100, 100, num_classes=3)


# ------------------------------------------------------------------------------------------------
# Partitions.


def _labels(n=2000, c=10, seed=0):
  return np.random.default_rng(seed).permutation(np.arange(n) % c).astype(np.int32)


@pytest.mark.parametrize('alpha', [0.05, 0.5, 5.0])
def test_dirichlet_partition_covers_every_example_once_with_min_size(alpha):
  labels = _labels()
  parts = data.dirichlet_partition(labels, 20, alpha, seed=1, min_size=30)
  assert len(parts) == 20
  allidx = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
  assert min(len(p) for p in parts) >= 30
  assert all(np.all(np.diff(p) > 0) for p in parts)


def test_dirichlet_partition_is_deterministic_in_seed():
  labels = _labels()
  a = data.dirichlet_partition(labels, 10, 0.5, seed=3)
  b = data.dirichlet_partition(labels, 10, 0.5, seed=3)
  c = data.dirichlet_partition(labels, 10, 0.5, seed=4)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_min_size_repair_when_draws_fail():
  # 100 clients of at least 19 examples out of 2000 at a = 0.01 almost never happens by draw.
  labels = _labels()
  parts = data.dirichlet_partition(labels, 100, 0.01, seed=0, min_size=19, max_tries=2)
  assert min(len(p) for p in parts) >= 19
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(2000))


def test_label_skew_falls_as_dirichlet_parameter_grows():
  labels = _labels(4000)
  skews = []
  for alpha in (0.05, 0.1, 0.5, 1.0, 10.0, 100.0):
    # Averaged over seeds so the measurement, not one draw, is compared.
    s = [
      data.label_skew(labels, data.dirichlet_partition(labels, 20, alpha, seed=s), 10)
      for s in range(3)
    ]
    skews.append({k: np.mean([x[k] for x in s]) for k in s[0]})
  kls = [s['mean_kl'] for s in skews]
  shares = [s['mean_max_share'] for s in skews]
  assert all(a > b for a, b in zip(kls, kls[1:])), kls
  assert all(a > b for a, b in zip(shares, shares[1:])), shares
  assert kls[0] > 1.0 and kls[-1] < 0.05
  assert skews[0]['mean_classes'] < 4 and skews[-1]['mean_classes'] == 10


def test_iid_partition_balanced_and_unskewed():
  labels = _labels(2000)
  parts = data.iid_partition(2000, 30, seed=0)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 2000
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(2000))
  iid = data.label_skew(labels, parts, 10)['mean_kl']
  skewed = data.label_skew(labels, data.dirichlet_partition(labels, 30, 0.5, seed=0), 10)
  assert iid < 0.2 < skewed['mean_kl']
  same = data.partition(labels, 30, 0.0, seed=0)  # a = 0 selects IID
  assert all(np.array_equal(x, y) for x, y in zip(parts, same))


def test_label_skew_hand_case():
  labels = np.array([0, 0, 1, 1])
  balanced = data.label_skew(labels, [np.array([0, 2]), np.array([1, 3])], 2)
  assert balanced['mean_kl'] == pytest.approx(0.0)
  assert balanced['mean_max_share'] == pytest.approx(0.5)
  split = data.label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2)
  assert split['mean_kl'] == pytest.approx(np.log(2))
  assert split['mean_max_share'] == pytest.approx(1.0)
  assert split['mean_classes'] == 1


def test_partition_bad_arguments():
  with pytest.raises(ValueError):
    data.dirichlet_partition(_labels(100), 20, 0.5, seed=0, min_size=10)
  with pytest.raises(ValueError):
    data.dirichlet_partition(_labels(100), 5, 0.0, seed=0)
  with pytest.raises(ValueError):
    data.iid_partition(10, 11, seed=0)


# ------------------------------------------------------------------------------------------------
# Pipelines and ClientData.


def test_client_dataset_fn_and_pipeline():
  ds = data.synthetic(100, 20, seed=0)
  parts = data.iid_partition(100, 4, seed=0)
  fn = data.make_client_dataset_fn(ds.train_images, ds.train_labels, parts)
  raw = list(fn('2').as_numpy_iterator())
  assert len(raw) == 25
  np.testing.assert_array_equal(np.stack([r[0] for r in raw]), ds.train_images[parts[2]])
  batched = data.client_dataset(fn('2'), batch_size=10, epochs=2, shuffle_seed=5)
  batches = list(batched.as_numpy_iterator())
  assert [len(b[1]) for b in batches] == [10, 10, 10, 10, 10]
  x0, y0 = batches[0]
  assert x0.dtype == np.float32 and 0.0 <= x0.min() and x0.max() <= 1.0 and y0.dtype == np.int32
  again = list(
    data.client_dataset(fn('2'), batch_size=10, epochs=2, shuffle_seed=5).as_numpy_iterator()
  )
  np.testing.assert_array_equal(batches[3][1], again[3][1])  # same seed, same order
  # Each epoch is a permutation of the client's labels.
  labels = np.concatenate([b[1] for b in batches])
  np.testing.assert_array_equal(np.sort(labels[:25]), np.sort(ds.train_labels[parts[2]]))
  # Works traced inside tf.function as well.
  count = tf.function(lambda cid: fn(cid).reduce(0, lambda s, _: s + 1))(tf.constant('1'))
  assert int(count) == 25


def test_test_dataset_in_order():
  ds = data.synthetic(20, 30, seed=0)
  batches = list(
    data.test_dataset(ds.test_images, ds.test_labels, batch_size=8).as_numpy_iterator()
  )
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), ds.test_labels)
  np.testing.assert_allclose(batches[0][0], ds.test_images[:8] / 255.0, atol=1e-6)


def test_client_data_round_trip():
  from tff_programs import client_data  # pylint: disable=import-outside-toplevel

  ds = data.synthetic(120, 20, seed=1)
  parts = data.dirichlet_partition(ds.train_labels, 6, 0.5, seed=0, min_size=5)
  cd = client_data.make_client_data(ds.train_images, ds.train_labels, parts)
  assert cd.client_ids == ['0', '1', '2', '3', '4', '5']
  assert client_data.client_sizes(parts) == [len(p) for p in parts]
  for cid, idx in zip(cd.client_ids, parts):
    got = list(cd.create_tf_dataset_for_client(cid).as_numpy_iterator())
    np.testing.assert_array_equal(np.array([g[1] for g in got]), ds.train_labels[idx])
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), ds.train_images[idx])
  spec = cd.element_type_structure
  assert spec[0].dtype == tf.uint8 and spec[0].shape == (32, 32, 3) and spec[1].dtype == tf.int32
  test = list(client_data.make_test_dataset(ds, batch_size=7).as_numpy_iterator())
  assert sum(len(b[1]) for b in test) == 20


def test_client_dataset_unbatched_is_float_examples():
  ds = data.synthetic(40, 20, seed=0)
  fn = data.make_client_dataset_fn(ds.train_images, ds.train_labels, [np.arange(40)])
  out = data.client_dataset(fn('0'), shuffle_seed=1)
  assert out.element_spec[0].shape == (32, 32, 3) and out.element_spec[0].dtype == tf.float32
  ys = np.array([y for _, y in out.as_numpy_iterator()])
  np.testing.assert_array_equal(np.sort(ys), np.sort(ds.train_labels))


def test_as_float_client_data_equals_uint8_pipeline():
  from tff_programs import client_data  # pylint: disable=import-outside-toplevel

  ds = data.synthetic(60, 20, seed=2)
  parts = data.iid_partition(60, 3, seed=0)
  plain = client_data.make_client_data(ds.train_images, ds.train_labels, parts)
  floats = client_data.make_client_data(ds.train_images, ds.train_labels, parts, as_float=True)
  assert floats.element_type_structure[0].dtype == tf.float32
  a = list(
    data.client_dataset(plain.create_tf_dataset_for_client('1'), shuffle_seed=4).as_numpy_iterator()
  )
  b = list(
    data.client_dataset(
      floats.create_tf_dataset_for_client('1'), shuffle_seed=4
    ).as_numpy_iterator()
  )
  np.testing.assert_allclose(np.stack([x for x, _ in a]), np.stack([x for x, _ in b]), atol=1e-7)
  np.testing.assert_array_equal([y for _, y in a], [y for _, y in b])


# ------------------------------------------------------------------------------------------------
# File names and damaged images as a user's folders hold them.


def test_image_with_a_non_utf8_name_is_read(tmp_path):
  written = _write_cinic(str(tmp_path))
  image = next(iter(written.values()))
  odd = os.path.join(os.fsencode(str(tmp_path)), b'train', b'bird', b'img_\xff.png')
  with open(odd, 'wb') as f:
    f.write(tf.io.encode_png(image).numpy())
  ds = data.load_cinic10(str(tmp_path))
  assert len(ds.train_labels) == len(data.CINIC10_CLASSES) + 1
  assert any(np.array_equal(x, image) for x in ds.train_images[ds.train_labels == 2])


def test_a_newline_in_a_damaged_file_name_stays_on_one_line(tmp_path):
  _write_cinic(str(tmp_path))
  bad = tmp_path / 'test' / 'horse' / 'img\n1.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(data.DataError) as e:
    data.load_cinic10(str(tmp_path))
  _one_line_error(e, 'img\\n1.png', 'unreadable image')


def test_random_bytes_jpeg_is_one_line_error_without_library_warnings(tmp_path):
  _write_tiny(str(tmp_path))
  bad = tmp_path / 'val' / 'images' / 'val_1.JPEG'
  bad.write_bytes(b'\xff\xd8\xff\xe0' + np.random.RandomState(0).bytes(3000))
  code = (
    'import sys; from fedmef_tf import data\n'
    'try:\n  data.load_tinyimagenet(sys.argv[1])\n'
    'except data.DataError as e:\n  print(e, file=sys.stderr)\n'
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='3',
    PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  proc = subprocess.run(
    [sys.executable, '-c', code, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f'{bad}: unreadable image')
