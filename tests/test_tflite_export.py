"""TFLite export for on-device training (issue 6): export, verify checks, tfmot, bad input.

Small CNN only (16x16 inputs, batch 8), so that the file runs in a few minutes on 2 cores.
"""

import contextlib
import gc
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from fedmef_tf import model_io
from fedmef_tf import models
from tflite_export import checks as checks_lib
from tflite_export import chunked_conv
from tflite_export import export
from tflite_export import litert_runtime
from tflite_export import memprobe
from tflite_export import select_ops
from tflite_export import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_SHAPE = (16, 16, 3)
BATCH = 8
DENSITY = 0.2


def _run_export(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = export.run(['export'] + list(argv))
  return rc, out.getvalue(), err.getvalue()


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
    [sys.executable, '-m', 'tflite_export.export', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


#: Input normalisation constants of the trained model (as a run stores them).
INPUT_MEAN = [0.49, 0.48, 0.45]
INPUT_STD = [0.25, 0.24, 0.26]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp('tflite')


@pytest.fixture(scope='module')
def trained_model(workdir):
  """A fedmef cnn saved as a training run's final model (weights moved away from init)."""
  model = models.build_model(
    'cnn',
    'fedmef',
    input_shape=INPUT_SHAPE,
    density=DENSITY,
    gamma=0.7,
    seed=3,
    input_mean=INPUT_MEAN,
    input_std=INPUT_STD,
  )
  for v in model.trainable_variables:  # stand-in for training: any change of the weights
    v.assign(v * 1.5)
  run_dir = workdir / 'run'
  config = {
    'model': 'cnn',
    'variant': 'fedmef',
    'num_classes': 10,
    'input_shape': list(INPUT_SHAPE),
    'gamma': 0.7,
    'density': DENSITY,
    'seed': 3,
    'input_mean': INPUT_MEAN,
    'input_std': INPUT_STD,
  }
  model_io.save_model(model, config, str(run_dir / export.RUN_MODEL_SUBDIR))
  return model, run_dir


@pytest.fixture(scope='module')
def fedmef_export(workdir, trained_model):
  """CLI export of the run's final model, with the on-device memory measurement."""
  _, run_dir = trained_model
  path = workdir / 'fedmef.tflite'
  rc, out, err = _run_export(
    [f'--root_dir={run_dir}', f'--output={path}', f'--batch_size={BATCH}', '--learning_rate=0.05']
  )
  assert rc == 0, err
  return str(path), out


#: An im2col budget under which every 3x3 conv of the test CNN runs in batch slices
#: (`tflite_export.chunked_conv`; the default 1 MiB slices nothing at 16x16, batch 8).
SLICING_KIB = 64


def _fresh_export(workdir, name, variant, *flags):
  """In-process export of a fresh registry cnn at the test size, no memory measurement."""
  path = workdir / f'{name}.tflite'
  rc, out, err = _run_export(
    [
      '--model=cnn',
      f'--variant={variant}',
      f'--density={DENSITY}',
      '--input_shape=16,16,3',
      f'--batch_size={BATCH}',
      f'--output={path}',
      '--nomeasure_memory',
      *flags,
    ]
  )
  assert rc == 0, err
  return str(path), out


@pytest.fixture(scope='module')
def baseline_export(workdir):
  return _fresh_export(workdir, 'baseline', 'baseline', f'--max_im2col_kib={SLICING_KIB}')


@pytest.fixture(scope='module')
def tfmot_export(workdir):
  return _fresh_export(workdir, 'tfmot', 'tfmot')


_VERIFIED = {}


def _checks(path, runtime='tflite'):
  if (path, runtime) not in _VERIFIED:
    _VERIFIED[path, runtime] = {c.name: c for c in verify.verify(path, steps=4, runtime=runtime)}
  return _VERIFIED[path, runtime]


def _select_tf_ops(path):
  with open(path, 'rb') as f:
    return select_ops.select_tf_ops_by_signature(f.read())


@pytest.fixture(scope='module')
def sliced_fedmef_export(workdir):
  return _fresh_export(workdir, 'fedmef_sliced', 'fedmef', f'--max_im2col_kib={SLICING_KIB}')


@pytest.fixture(params=['fedmef', 'baseline', 'sliced_fedmef'])
def masked_export(request):
  return request.getfixturevalue(request.param + '_export')[0]


def _train_ops(path, op_name):
  """How many operators of the `train` subgraph are `op_name`."""
  return _train_graph(path)[1].count(op_name)


# -- export ---------------------------------------------------------------------------------------


def test_fedmef_export_has_all_signatures_and_shapes(fedmef_export):
  interpreter = tf.lite.Interpreter(model_path=fedmef_export[0])
  sigs = interpreter.get_signature_list()
  for name in (
    'train',
    'infer',
    'get_weights',
    'set_weights',
    'save',
    'restore',
    'set_learning_rate',
    'metadata',
    'dense_gradients',
  ):
    assert name in sigs
  assert sigs['train']['inputs'] == ['x', 'y'] and sigs['train']['outputs'] == ['loss']
  assert sigs['infer']['outputs'] == ['logits']
  details = interpreter.get_signature_runner('train').get_input_details()
  assert list(details['x']['shape']) == [BATCH, *INPUT_SHAPE]
  assert list(details['y']['shape']) == [BATCH]
  meta = verify.read_metadata(interpreter)
  assert meta['variant'] == 'fedmef' and meta['gamma'] == 0.7
  assert meta['learning_rate'] == pytest.approx(0.05)


def test_export_normalises_its_input_as_the_tf_model_does(fedmef_export, trained_model):
  model, _ = trained_model
  interpreter = tf.lite.Interpreter(model_path=fedmef_export[0])
  meta = verify.read_metadata(interpreter)
  assert meta['input_mean'] == INPUT_MEAN and meta['input_std'] == INPUT_STD
  infer = interpreter.get_signature_runner('infer')
  x = np.random.default_rng(5).random((BATCH,) + tuple(INPUT_SHAPE)).astype(np.float32)
  got = infer(x=x)['logits']
  want = model(x, training=False).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The same model without the normalisation gives other logits: the layer is in the file.
  plain = models.build_model('cnn', 'fedmef', input_shape=INPUT_SHAPE, gamma=0.7, seed=3)
  plain.set_weights(model.get_weights())
  assert np.abs(plain(x, training=False).numpy() - want).max() > 10 * np.abs(got - want).max()


def test_export_of_final_model_keeps_its_weights_and_masks(fedmef_export, trained_model):
  model, _ = trained_model
  interpreter = tf.lite.Interpreter(model_path=fedmef_export[0])
  weights = interpreter.get_signature_runner('get_weights')()
  meta = verify.read_metadata(interpreter)
  assert len(meta['weight_names']) == len(model.variables)
  for name, v in zip(meta['weight_names'], model.variables):
    np.testing.assert_array_equal(weights[name], v.numpy(), err_msg=name)


def test_export_prints_size_densities_and_memory(fedmef_export):
  path, out = fedmef_export
  assert f'{os.path.getsize(path)} bytes' in out
  for layer in ('stem_conv', 'conv1_conv', 'conv2_conv', 'conv3_conv', 'classifier'):
    assert layer in out
  global_line = [l for l in out.splitlines() if l.strip().startswith('global')][0]
  assert float(global_line.split()[-1]) == pytest.approx(DENSITY, abs=1e-3)
  peak_line = [l for l in out.splitlines() if l.startswith('on-device train peak')][0]
  assert float(peak_line.split(':')[1].split()[0]) > 0.0


def test_fedmef_train_graph_uses_the_static_sap_storage(fedmef_export):
  # tflite_export.static_sap must be in force when the graph is traced: TOPK_V2 selects the
  # kept activations, and none of fedmef_tf.sap's own histogram selection is left.
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    tf.lite.experimental.Analyzer.analyze(model_path=fedmef_export[0])
  ops = text.getvalue()
  assert ops.count('TOPK_V2(') == 5  # 4 convs and the classifier
  assert 'Bincount' not in ops and ' WHERE(' not in ops


def test_train_convolutions_run_in_batch_slices_under_a_budget(fedmef_export, sliced_fedmef_export):
  # The test CNN has four 3x3 convs; at 16x16, batch 8 the default budget slices none of them;
  # with 64 KiB each runs in the slices chunked_conv.slice_count asks for (the values are
  # checked by verify, masked_export).
  assert _train_ops(fedmef_export[0], 'CONV_2D') == 4
  expected, size, c_in = 0, INPUT_SHAPE[0], INPUT_SHAPE[2]
  for filters, stride in models.CNN_LAYERS:
    work = chunked_conv.im2col_bytes(
      [BATCH, size, size, c_in], [3, 3, c_in, filters], (1, stride, stride, 1), 'SAME'
    )
    expected += chunked_conv.slice_count(BATCH, work, SLICING_KIB * 1024)
    size, c_in = -(-size // stride), filters
  assert expected > 4
  assert _train_ops(sliced_fedmef_export[0], 'CONV_2D') == expected
  meta = json.loads(
    tf.lite.Interpreter(model_path=sliced_fedmef_export[0])
    .get_signature_runner('metadata')()['json']
    .item()
    .decode()
  )
  assert meta['max_im2col_bytes'] == SLICING_KIB * 1024


def _train_graph(path):
  """(the `train` subgraph, its operators' names: builtin names, custom codes for custom ops
  such as `FlexConv2DBackpropFilter`, and tensor index -> producing operator index)."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top

  with open(path, 'rb') as f:
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(f.read(), 0))
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
  train = {s.signatureKey.decode(): s.subgraphIndex for s in model.signatureDefs}['train']
  graph = model.subgraphs[train]
  codes = [model.operatorCodes[op.opcodeIndex] for op in graph.operators]
  kinds = [
    c.customCode.decode()
    if c.customCode
    else names.get(max(c.builtinCode, c.deprecatedBuiltinCode), '?')
    for c in codes
  ]
  producer = {t: k for k, op in enumerate(graph.operators) for t in op.outputs}
  return graph, kinds, producer


def _ancestor_kinds(graph, kinds, producer, k):
  seen, stack = set(), [k]
  while stack:
    j = stack.pop()
    for t in graph.operators[j].inputs:
      p = producer.get(t)
      if p is not None and p not in seen:
        seen.add(p)
        stack.append(p)
  return {kinds[j] for j in seen}


def test_backward_rebuilds_and_forward_slices_wait_for_their_inputs(sliced_fedmef_export):
  # The converter drops control dependencies, and the interpreter runs a node as early as its
  # inputs allow when it partitions the graph around select-TF nodes. Without data
  # dependencies every SAP layer's input was rebuilt (SCATTER_ND) at the start of the backward
  # pass, and every slice of a sliced convolution was cut before the first slice's CONV_2D,
  # all of them held at once.
  graph, kinds, producer = _train_graph(sliced_fedmef_export[0])
  rebuilds = [k for k, kind in enumerate(kinds) if kind == 'SCATTER_ND']
  assert len(rebuilds) == 5  # 4 convs and the classifier
  for k in rebuilds:  # each waits for the loss gradient (SOFTMAX of the cross-entropy's grad)
    assert 'SOFTMAX' in _ancestor_kinds(graph, kinds, producer, k), k
  slices = [
    op
    for op, kind in zip(graph.operators, kinds)
    if kind == 'GATHER' and len(graph.tensors[op.outputs[0]].shape) == 4
  ]
  assert len(slices) > 4
  for op in slices:  # rows computed from the previous slice's output, not constant
    assert op.inputs[1] in producer


def test_fedmef_export_needs_no_select_tf_op_in_any_signature(fedmef_export, workdir):
  # Weight gradients from builtin ops (tflite_export.filter_grad), the ReLU mask kept as bool
  # (static_sap.TOPK.store_mask), checkpoints as a float32 vector (tflite_export.checkpoint):
  # nothing of FedMef's export runs through the Flex delegate, and the exporter says so.
  by_signature = _select_tf_ops(fedmef_export[0])
  assert sorted(by_signature) == sorted(
    verify.read_metadata(tf.lite.Interpreter(model_path=fedmef_export[0]))['signatures']
  )
  assert all(ops == [] for ops in by_signature.values()), by_signature
  assert [k for k in _train_graph(fedmef_export[0])[1] if k.startswith('Flex')] == []
  assert 'select-TF ops: none' in fedmef_export[1]
  # The check sees select-TF operators where there are some: TF's own weight gradients.
  flex_path, flex_out = _fresh_export(
    workdir, 'fedmef_tfgrad', 'fedmef', '--nobuiltin_weight_grads'
  )
  assert 'FlexConv2DBackpropFilter' in _train_graph(flex_path)[1]
  assert _select_tf_ops(flex_path)['train'] == ['Conv2DBackpropFilter']
  assert _select_tf_ops(flex_path)['infer'] == []
  assert 'select-TF ops: needed (Conv2DBackpropFilter) by ' in flex_out


def test_baseline_export_converts(baseline_export):
  interpreter = tf.lite.Interpreter(model_path=baseline_export[0])
  assert verify.read_metadata(interpreter)['variant'] == 'baseline'
  assert 'global' in baseline_export[1]


def test_baseline_train_needs_select_tf_ops_that_stock_litert_lacks(baseline_export):
  # BatchNorm's training step keeps TF ops in the file; the LiteRT child (no TensorFlow in
  # it) refuses them, which shows that it is the stock runtime, and verify says so up front.
  needed = _select_tf_ops(baseline_export[0])
  assert needed['train'] and not needed['infer']
  with litert_runtime.LiteRTInterpreter(baseline_export[0]) as lite:
    x = np.zeros((BATCH, *INPUT_SHAPE), np.float32)
    assert lite.get_signature_runner('infer')(x=x)['logits'].shape == (BATCH, 10)
    with pytest.raises(RuntimeError, match='Select TensorFlow op'):
      lite.get_signature_runner('train')(x=x, y=np.zeros([BATCH], np.int32))
  with pytest.raises(ValueError, match='needs select-TF ops'):
    verify.verify(baseline_export[0], runtime='litert')


def test_memprobe_measures_a_positive_train_peak(baseline_export):
  memory = memprobe.measure_train_peak(baseline_export[0])
  assert memory['train_peak'] > 0
  assert memory['idle_delta'] < memory['train_delta']
  assert memory['steady_peak'] > 0  # a later call's peak still holds the arena


# -- verify checks ----------------------------------------------------------------------------


def test_infer_matches_tf(masked_export):
  assert _checks(masked_export)['infer matches TF'].ok


def test_dense_gradients_match_tf(masked_export):
  check = _checks(masked_export)['dense_gradients matches TF']
  assert check.ok, check.detail


def test_one_train_step_matches_tf(masked_export):
  check = _checks(masked_export)['train step matches TF']
  assert check.ok, check.detail


def test_fedmef_train_step_uses_sap(fedmef_export):
  check = _checks(fedmef_export[0])['train step uses SAP']
  assert check.ok, check.detail


def test_train_step_with_bae_matches_tf(masked_export):
  check = _checks(masked_export)['train step with BaE matches TF']
  assert check.ok, check.detail


def test_masked_weights_stay_exactly_zero(masked_export):
  check = _checks(masked_export)['masked weights stay zero']
  assert check.ok, check.detail


def test_loss_falls(masked_export):
  check = _checks(masked_export)['loss falls']
  assert check.ok, check.detail


def test_weight_round_trip_is_exact(masked_export):
  assert _checks(masked_export)['set_weights/get_weights round trip'].ok


def test_save_restore_round_trip_is_exact(masked_export):
  assert _checks(masked_export)['save/restore round trip'].ok


def test_learning_rate_is_settable(masked_export):
  assert _checks(masked_export)['set_learning_rate applies'].ok


def test_the_checks_of_a_good_export_hold_their_numbers(fedmef_export):
  got = _checks(fedmef_export[0])
  infer = got['infer matches TF']
  assert infer.shape == (BATCH, 10) and infer.max_abs_diff <= infer.tolerance
  assert infer.tolerance >= checks_lib.INFER_TOL
  step = got['train step matches TF']
  assert step.loss_diff <= step.loss_tolerance and step.mismatch.ok
  assert step.mismatch.max_allowed >= checks_lib.STEP_RTOL
  assert got['train step uses SAP'].effect > checks_lib.SAP_EFFECT_MIN
  assert got['train step with BaE matches TF'].bae_effect > 0
  zeros = got['masked weights stay zero']
  assert zeros.kernels == 5 and zeros.masked > 0 and zeros.nonzero == 0
  falls = got['loss falls']
  assert len(falls.losses) == 4 and falls.losses[-1] < falls.losses[0]
  assert got['set_learning_rate applies'].changed == ()


def test_the_checks_fail_an_export_broken_on_purpose(fedmef_export):
  # The file's own weights and logits, then one masked entry set nonzero and one logit
  # moved beyond the tolerance: each check fails with the number it measured.
  interpreter = tf.lite.Interpreter(model_path=fedmef_export[0])
  meta = verify.read_metadata(interpreter)
  w = interpreter.get_signature_runner('get_weights')()
  pairs = checks_lib.mask_pairs(meta['weight_names'])
  kernel, mask = next((k, m) for k, m in pairs if np.any(w[m] == 0))
  broken = dict(w)
  broken[kernel] = w[kernel].copy()
  broken[kernel][np.unravel_index(int(np.argmin(w[mask])), w[mask].shape)] = 0.5
  assert checks_lib.masked_zeros(w, w, pairs, 1).ok
  result = checks_lib.masked_zeros(w, broken, pairs, 1)
  assert not result.ok and result.nonzero == 1 and result.kernels == len(pairs)
  x, _ = _batch(5)
  logits = interpreter.get_signature_runner('infer')(x=x)['logits']
  assert checks_lib.infer_matches(logits, logits).max_abs_diff == 0.0
  tol = checks_lib.infer_matches(logits, logits).tolerance
  moved = logits.copy()
  moved[1, 2] += 3 * tol
  result = checks_lib.infer_matches(moved, logits)
  assert not result.ok and result.max_abs_diff == pytest.approx(3 * tol, rel=1e-3)


def test_litert_compatibility_names_the_select_tf_ops(fedmef_export, baseline_export):
  with open(fedmef_export[0], 'rb') as f:
    assert checks_lib.litert_compatible(f.read()).ok
  with open(baseline_export[0], 'rb') as f:
    result = checks_lib.litert_compatible(f.read())
  assert not result.ok and result.select_tf_ops
  assert set(_select_tf_ops(baseline_export[0])['train']) <= set(result.select_tf_ops)


# -- stock LiteRT (ai_edge_litert, no select-TF ops) -------------------------------------------


def test_every_signature_of_the_fedmef_export_passes_verify_on_stock_litert(fedmef_export):
  # infer, dense_gradients, train (with SAP, with BaE), get/set_weights, save/restore through
  # the app's file, set_learning_rate and metadata, each against the TF model.
  checks = _checks(fedmef_export[0], 'litert')
  assert [c.line() for c in checks.values() if not c.ok] == []
  assert len(checks) == 10


def _batch(seed):
  rng = np.random.default_rng(seed)
  return (
    rng.random((BATCH, *INPUT_SHAPE)).astype(np.float32),
    rng.integers(0, 10, BATCH).astype(np.int32),
  )


def test_train_gives_the_same_result_on_both_runtimes(fedmef_export):
  path = fedmef_export[0]
  x, y = _batch(11)
  results = []
  with litert_runtime.LiteRTInterpreter(path) as lite:
    for interpreter in (tf.lite.Interpreter(model_path=path), lite):
      before = interpreter.get_signature_runner('get_weights')()
      train = interpreter.get_signature_runner('train')
      losses = [float(train(x=x, y=y)['loss']) for _ in range(2)]
      results.append((before, losses, interpreter.get_signature_runner('get_weights')()))
  (before, losses_tf, after_tf), (before_lite, losses_lite, after_lite) = results
  assert all(np.array_equal(before[n], before_lite[n]) for n in before)  # the same start
  np.testing.assert_allclose(losses_lite, losses_tf, rtol=verify.LOSS_RTOL)
  moved = 0
  for name, value in after_tf.items():
    update = float(np.max(np.abs(value - before[name])))
    moved += update > 0
    assert np.max(np.abs(after_lite[name] - value)) <= verify.STEP_RTOL * update + 1e-7, name
  assert moved > 10  # the steps changed the weights


def test_twenty_train_calls_on_stock_litert_lower_the_loss_and_keep_masked_zeros(fedmef_export):
  x, y = _batch(12)
  with litert_runtime.LiteRTInterpreter(fedmef_export[0], num_threads=1) as lite:
    before = lite.get_signature_runner('get_weights')()
    train = lite.get_signature_runner('train')
    losses = [float(train(x=x, y=y)['loss']) for _ in range(20)]
    after = lite.get_signature_runner('get_weights')()
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] and max(losses[-5:]) < min(losses[:5]), losses
  by_suffix = {n.split('_', 1)[1]: n for n in after}  # names are w<index>_<layer>_<variable>
  pairs = [
    (n, by_suffix[n.split('_', 1)[1][: -len('kernel')] + 'mask'])
    for n in after
    if n.endswith('_kernel') and n.split('_', 1)[1][: -len('kernel')] + 'mask' in by_suffix
  ]
  assert len(pairs) == 5
  masked = 0
  for kernel, mask_name in pairs:
    mask = after[mask_name]
    np.testing.assert_array_equal(mask, before[mask_name])
    masked += int(np.count_nonzero(mask == 0))
    assert np.count_nonzero(after[kernel][mask == 0]) == 0, kernel
  assert masked > 0


def test_verify_fails_a_step_with_the_wrong_learning_rate(monkeypatch, fedmef_export):
  rebuild = verify._rebuild  # pylint: disable=protected-access

  def off_by_ten_percent(meta):
    return rebuild(dict(meta, learning_rate=1.1 * float(meta['learning_rate'])))

  monkeypatch.setattr(verify, '_rebuild', off_by_ten_percent)
  checks = {c.name: c for c in verify.verify(fedmef_export[0], steps=2)}
  assert checks['dense_gradients matches TF'].ok  # the rate does not enter the gradients
  assert not checks['train step matches TF'].ok
  assert not checks['train step with BaE matches TF'].ok


def test_verify_cli_exit_status(baseline_export):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  ok = subprocess.run(
    [sys.executable, '-m', 'tflite_export.verify', baseline_export[0], '--steps=3'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert ok.returncode == 0, ok.stdout + ok.stderr
  assert 'FAIL' not in ok.stdout
  # As from a shell (no TF_CPP_MIN_LOG_LEVEL; TensorFlow imported by the flag parser's
  # preload): one line, none of the C++ log lines TensorFlow's import prints by default.
  shell_env = {k: v for k, v in env.items() if k not in ('TF_CPP_MIN_LOG_LEVEL', 'FEDMEF_VERBOSE')}
  missing = subprocess.run(
    [sys.executable, '-m', 'tflite_export.verify', '/nonexistent.tflite'],
    cwd=ROOT,
    env=shell_env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert missing.returncode == 2, missing.stderr
  assert missing.stderr.strip().splitlines() == [
    'verify: error: /nonexistent.tflite: no such file'
  ], missing.stderr


def test_train_step_rezeroes_values_loaded_under_the_mask(fedmef_export):
  # set_weights stores what it is given; the next train step enforces the mask again.
  interpreter = tf.lite.Interpreter(model_path=fedmef_export[0])
  meta = verify.read_metadata(interpreter)
  get = interpreter.get_signature_runner('get_weights')
  w = get()
  pairs = checks_lib.mask_pairs(meta['weight_names'])
  kernel, mask = [p for p in pairs if p[0].endswith('conv1_conv_kernel')][0]
  w[kernel] = np.where(w[mask] == 0, 1.0, w[kernel]).astype(np.float32)
  interpreter.get_signature_runner('set_weights')(**w)
  rng = np.random.RandomState(0)
  x = rng.standard_normal((BATCH, *INPUT_SHAPE)).astype(np.float32)
  y = rng.randint(0, 10, size=(BATCH,)).astype(np.int32)
  interpreter.get_signature_runner('train')(x=x, y=y)
  after = get()
  assert np.count_nonzero(after[kernel][after[mask] == 0]) == 0


# -- tfmot ------------------------------------------------------------------------------------


def test_tfmot_export_is_sparse_and_runs(tfmot_export):
  path, out = tfmot_export
  global_line = [l for l in out.splitlines() if l.strip().startswith('global')][0]
  assert float(global_line.split()[-1]) == pytest.approx(DENSITY, abs=0.01)
  checks = _checks(path)
  assert checks['train step matches TF'].ok, checks['train step matches TF'].detail
  assert checks['loss falls'].ok
  assert checks['save/restore round trip'].ok
  # No mask in a stripped tfmot model: reported as not applicable, not as a pass.
  assert checks['masked weights stay zero'].ok is None


# -- bad input --------------------------------------------------------------------------------


def _assert_one_line_error(proc, output, needle):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert needle in lines[0]
  assert not os.path.exists(output)


def test_run_dir_without_final_model(tmp_path):
  out = tmp_path / 'm.tflite'
  (tmp_path / 'run').mkdir()
  proc = _cli(f'--root_dir={tmp_path / "run"}', f'--output={out}')
  _assert_one_line_error(proc, out, 'no final model')


def test_unknown_registry_name(tmp_path):
  out = tmp_path / 'm.tflite'
  proc = _cli('--model=vgg99', f'--output={out}')
  _assert_one_line_error(proc, out, "unknown model 'vgg99'")


def test_saved_model_with_unknown_name(tmp_path):
  model_dir = tmp_path / 'saved'
  model_dir.mkdir()
  (model_dir / model_io.CONFIG_FILE).write_text(
    json.dumps(
      {'model': 'vgg99', 'variant': 'fedmef', 'num_classes': 10, 'input_shape': [32, 32, 3]}
    )
  )
  (model_dir / model_io.WEIGHTS_FILE).write_bytes(b'')
  out = tmp_path / 'm.tflite'
  rc, _, err = _run_export([f'--model_dir={model_dir}', f'--output={out}'])
  assert rc != 0 and "unknown model 'vgg99'" in err and len(err.strip().splitlines()) == 1
  assert not out.exists()


def test_model_with_a_mask_that_is_not_binary(tmp_path):
  # The on-device step keeps masks as bools (tflite_export.layer_updates): refused, one line.
  model = models.build_model('cnn', 'fedmef', input_shape=INPUT_SHAPE, density=DENSITY, seed=1)
  layer = [l for l in model.submodules if getattr(l, 'mask', None) is not None][1]
  layer.mask.assign(layer.mask * 0.5)
  out = tmp_path / 'm.tflite'
  with pytest.raises(export.ExportError, match='must be 0 or 1'):
    export.export_model(
      model, {'model': 'cnn', 'variant': 'fedmef'}, str(out), batch_size=BATCH, measure_memory=False
    )
  assert not out.exists()


def test_unwritable_output(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  out = blocker / 'm.tflite'
  proc = _cli('--model=cnn', f'--output={out}')
  _assert_one_line_error(proc, out, 'cannot write')
  out2 = tmp_path / 'missing_dir' / 'm.tflite'
  rc, _, err = _run_export(['--model=cnn', f'--output={out2}'])
  assert rc != 0 and 'does not exist' in err
  assert not out2.exists()


def test_negative_im2col_budget(tmp_path):
  out = tmp_path / 'm.tflite'
  rc, _, err = _run_export(['--model=cnn', f'--output={out}', '--max_im2col_kib=-1'])
  assert rc != 0 and err.strip() == 'export: error: --max_im2col_kib must be >= 0, got -1'
  assert not out.exists()


@pytest.mark.parametrize('failing', ['convert', 'measure'])
def test_no_partial_file_on_failure(monkeypatch, tmp_path, failing):
  """A failure before the file is written (conversion) or after the temporary file is written
  (measurement) leaves no file at the output, no temporary file, and an old file untouched."""
  existing = tmp_path / 'keep.tflite'
  existing.write_bytes(b'old')

  def boom(*args, **kwargs):
    raise RuntimeError('injected failure')

  if failing == 'convert':
    monkeypatch.setattr(export, 'convert', boom)
    target = tmp_path / 'm.tflite'
  else:
    monkeypatch.setattr(memprobe, 'measure_train_peak', boom)
    target = existing
  rc, _, err = _run_export(
    ['--model=cnn', '--input_shape=16,16,3', f'--batch_size={BATCH}', f'--output={target}']
  )
  assert rc == 1
  assert len(err.strip().splitlines()) == 1 and 'injected failure' in err
  assert existing.read_bytes() == b'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.tflite']  # nothing else left


@pytest.mark.parametrize('where', ['replace', 'conversion'])
def test_a_recorded_interrupt_stops_the_export_and_keeps_the_old_file(monkeypatch, tmp_path, where):
  """A Ctrl-C that Python swallowed (one raised inside a gc callback) or that TensorFlow turned
  into a conversion error (one raised while it traced the model) is still honoured: `main`'s
  recorded interrupt raises just before the replace and when the export fails, so the new file
  never replaces the old one and no temporary file is left."""
  existing = tmp_path / 'keep.tflite'
  existing.write_bytes(b'old')
  calls = []

  def stop_if_interrupted():
    calls.append(1)
    raise KeyboardInterrupt

  if where == 'conversion':

    def traced_interrupt(*args, **kwargs):
      raise RuntimeError('in user code: KeyboardInterrupt')

    monkeypatch.setattr(export, 'convert', traced_interrupt)
  with pytest.raises(KeyboardInterrupt):
    export.run(
      [
        'export',
        '--model=cnn',
        '--input_shape=16,16,3',
        f'--batch_size={BATCH}',
        f'--output={existing}',
        '--nomeasure_memory',
      ],
      stop_if_interrupted=stop_if_interrupted,
    )
  assert calls == [1]
  assert existing.read_bytes() == b'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.tflite']


def test_a_ctrl_c_inside_a_gc_callback_is_raised_after_it_as_one_line_and_status_130(
  monkeypatch, capsys
):
  """SIGINT while a garbage-collection callback runs (as jax's does): `main`'s handler does not
  raise there (Python would print "Exception ignored" and drop it) but raises it once the
  callback has returned; stderr holds only the one line."""

  def run_with_a_gc_interrupt(argv, stop_if_interrupted):
    del argv, stop_if_interrupted

    def callback(phase, info):
      del info
      if phase == 'start':
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):  # the handler runs here, inside the callback
          pass

    gc.callbacks.append(callback)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(callback)
    time.sleep(5)  # and the interrupt is raised here, once the callback has returned
    return 0

  monkeypatch.setattr(export, 'run', run_with_a_gc_interrupt)
  monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)  # Python's, not pytest's
  assert export.main(['export']) == 130
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [
    'export: error: interrupted; no file was written at --output (an earlier one there is kept)'
  ], err


# -- per-layer updates in the on-device train step, and the memory probe ---------------------------


@pytest.mark.parametrize(
  'variant,clipping', [('fedmef', None), ('fedmef', 0.16), ('baseline', None)]
)
def test_in_backward_updates_equal_the_plain_step(variant, clipping):
  """The TFLite train step's per-layer kernel (and gain) updates, traced in TF, give the plain
  step's variables (BaE on, values loaded under the mask, NSConv gains away from 1)."""
  from tflite_export import train_module  # pylint: disable=import-outside-toplevel

  def build():
    model = models.build_model(
      'cnn', variant, input_shape=INPUT_SHAPE, density=DENSITY, gamma=0.7, seed=5
    )
    rng = np.random.RandomState(1)
    for layer in model.submodules:
      if getattr(layer, 'marked', None) is not None:
        layer.marked.assign(layer.mask * (rng.uniform(size=layer.mask.shape) < 0.5))
        layer.bae_lambda.assign(0.5)
        layer.kernel.assign(layer.kernel + 0.01 * (1.0 - layer.mask))  # junk under the mask
      if getattr(layer, 'gain', None) is not None:
        layer.gain.assign(rng.uniform(0.5, 1.5, size=layer.gain.shape).astype(np.float32))
    return train_module.TrainModule(
      model, batch_size=BATCH, learning_rate=0.05, metadata={}, gradient_clipping=clipping
    )

  plain, fused = build(), build()
  fused._tracing_tflite = True  # pylint: disable=protected-access
  rng = np.random.RandomState(2)
  x = tf.constant(rng.standard_normal((BATCH, *INPUT_SHAPE)).astype(np.float32))
  y = tf.constant(rng.randint(0, 10, size=BATCH).astype(np.int32))
  loss_plain = float(plain.train(x, y)['loss'])
  loss_fused = float(fused.train(x, y)['loss'])
  assert loss_fused == pytest.approx(loss_plain, rel=1e-6)
  for a, b, v0 in zip(plain.model.variables, fused.model.variables, build().model.variables):
    update = np.abs(a.numpy() - v0.numpy()).max()
    np.testing.assert_allclose(
      b.numpy(), a.numpy(), rtol=0, atol=1e-4 * max(update, 1e-6), err_msg=a.name
    )
  for layer in fused.model.submodules:
    if getattr(layer, 'mask', None) is not None:
      assert not np.any(layer.kernel.numpy()[layer.mask.numpy() == 0])


def test_memprobe_excludes_variable_initialisation(tmp_path):
  """A train call that reads 8 entries of a 40 MB variable: the variable's one-time
  initialisation (first call of any signature) is not part of the measured peak."""
  n = 10_000_000

  class Big(tf.Module):
    def __init__(self):
      super().__init__()
      self.v = tf.Variable(tf.ones([n]))

    @tf.function(
      input_signature=[
        tf.TensorSpec([8], tf.float32, name='x'),
        tf.TensorSpec([8], tf.int32, name='y'),
      ]
    )
    def train(self, x, y):
      del y
      self.v.assign_add(x[0] * tf.ones([n]))
      return {'loss': tf.reduce_sum(tf.slice(self.v, [0], [8]) * x)}

    @tf.function(input_signature=[])
    def metadata(self):
      return {'json': tf.constant(json.dumps({'num_classes': 2}))}

  module = Big()
  saved = str(tmp_path / 'saved')
  tf.saved_model.save(
    module,
    saved,
    signatures={
      'train': module.train.get_concrete_function(),
      'metadata': module.metadata.get_concrete_function(),
    },
  )
  converter = tf.lite.TFLiteConverter.from_saved_model(saved)
  converter.target_spec.supported_ops = [
    tf.lite.OpsSet.TFLITE_BUILTINS,
    tf.lite.OpsSet.SELECT_TF_OPS,
  ]
  converter.experimental_enable_resource_variables = True
  path = tmp_path / 'big.tflite'
  path.write_bytes(converter.convert())
  peak = memprobe.measure_train_peak(str(path))['train_peak']
  # The step itself makes two 40 MB temporaries (ones * x[0], and the read for the add);
  # with the initialisation (the variable, and the init graph's own 40 MB constant fill)
  # counted, it measured well above 120 MB.
  assert 0 < peak < 100e6, peak


def test_benchmark_target_line_compares_each_variant_at_its_best():
  from benchmarks import tflite_memory  # pylint: disable=g-import-not-at-top

  mib = 2**20
  row = lambda variant, budget, peak: {
    'model': 'cnn',
    'batch': 32,
    'variant': variant,
    'budget_kib': budget,
    'peak_bytes': peak * mib,
  }
  # Equal settings flatter FedMef at 1024 KiB (25/48), but the baseline is lowest at 0 (36).
  rows = [
    row('fedmef', 1024, 25),
    row('baseline', 1024, 48),
    row('fedmef', 0, 27),
    row('baseline', 0, 36),
  ]
  lines = tflite_memory._ratios(rows)  # pylint: disable=protected-access
  assert lines[0].startswith('cnn batch 32 im2col 1024 KiB: fedmef/baseline 0.52x')
  assert lines[1].startswith('cnn batch 32 im2col 0 KiB: fedmef/baseline 0.75x')
  assert 'met' not in lines[0] and 'met' not in lines[1]  # no verdict at equal settings
  assert lines[2].endswith('= 0.69x  (target fedmef <= 0.45x: NOT met)')
  # Two kinds of weight gradient: each structure labelled, the baseline's lowest anywhere.
  tagged = [dict(r, weight_grads='builtin') for r in rows] + [
    dict(row('fedmef', 1024, 26), weight_grads='tf'),
    dict(row('baseline', 1024, 30), weight_grads='tf'),
  ]
  lines = tflite_memory._ratios(tagged)  # pylint: disable=protected-access
  assert 'cnn batch 32 im2col 1024 KiB, tf weight grads: fedmef/baseline 0.87x' in lines
  assert lines[-1].endswith(
    'fedmef 25.0 MiB / baseline 30.0 MiB = 0.83x  (target fedmef <= 0.45x: NOT met)'
  )
  # One budget: the verdict is at those settings.
  single = tflite_memory._ratios(rows[:2])  # pylint: disable=protected-access
  assert single == [
    'cnn batch 32 im2col 1024 KiB: fedmef/baseline 0.52x  (target fedmef <= 0.45x: NOT met)'
  ]
  lower = [row('fedmef', 1024, 20), rows[1]]
  single = tflite_memory._ratios(lower)  # pylint: disable=protected-access
  assert single == [
    'cnn batch 32 im2col 1024 KiB: fedmef/baseline 0.42x  (target fedmef <= 0.45x: met)'
  ]


def _timed_row(variant, seconds, model='cnn', batch=32, budget=1024):
  return {
    'model': model,
    'batch': batch,
    'variant': variant,
    'budget_kib': budget,
    'weight_grads': 'builtin',
    'size_bytes': 3 * 2**20,
    'density': 0.1,
    'peak_bytes': 10 * 2**20,
    'steady_bytes': 12 * 2**20,
    'train_seconds': seconds,
  }


def test_benchmark_time_columns_and_ratios_on_hand_made_rows():
  from benchmarks import tflite_memory  # pylint: disable=g-import-not-at-top

  fedmef = _timed_row('fedmef', {1: 0.3, 2: 0.2})
  line = tflite_memory.format_row(fedmef)
  assert 'train peak    10.00 MiB' in line and 'train    300.0 ms @1t' in line
  assert line.endswith('train    200.0 ms @2t')
  rows = [fedmef, _timed_row('baseline', {1: 0.1, 2: 0.08}), _timed_row('tfmot', {1: 0.12})]
  assert tflite_memory.time_ratio_lines(rows) == [
    'cnn batch 32 im2col 1024 KiB: train time fedmef/baseline 3.00x @1t, 2.50x @2t; '
    'tfmot/baseline 1.20x @1t  (target fedmef <= 1.5x at 1 thread: NOT met)'
  ]
  rows[0] = _timed_row('fedmef', {1: 0.15, 2: 0.1})  # exactly 1.5x: met
  assert tflite_memory.time_ratio_lines(rows)[0].endswith(
    '(target fedmef <= 1.5x at 1 thread: met)'
  )
  # Rows without times (memory only) give no time line; another batch gets its own.
  assert tflite_memory.time_ratio_lines([dict(r, train_seconds={}) for r in rows]) == []
  other = [_timed_row('fedmef', {1: 0.2}, batch=8), _timed_row('baseline', {1: 0.4}, batch=8)]
  assert tflite_memory.time_ratio_lines(rows + other)[0].startswith(
    'cnn batch 8 im2col 1024 KiB: train time fedmef/baseline 0.50x @1t'
  )


def test_benchmark_measures_time_beside_memory_on_real_exports(fedmef_export, baseline_export):
  from benchmarks import tflite_memory  # pylint: disable=g-import-not-at-top

  rows = []
  for variant, path in (('fedmef', fedmef_export[0]), ('baseline', baseline_export[0])):
    row = {
      'model': 'cnn',
      'batch': BATCH,
      'variant': variant,
      'budget_kib': 1024,
      'weight_grads': 'builtin',
      'size_bytes': os.path.getsize(path),
      'density': DENSITY,
    }
    # The peak columns are measured by memprobe, tested above; here only the times.
    row.update(tflite_memory.measure_export(path, threads=(1, 2), time_calls=2, memory=False))
    assert sorted(row['train_seconds']) == [1, 2]
    assert all(s > 0 for s in row['train_seconds'].values())
    assert '@1t' in tflite_memory.format_row(row) and '@2t' in tflite_memory.format_row(row)
    rows.append(row)
  lines = tflite_memory.time_ratio_lines(rows)
  assert len(lines) == 1 and lines[0].startswith(
    f'cnn batch {BATCH} im2col 1024 KiB: train time fedmef/baseline '
  )
  assert '@1t' in lines[0] and '@2t' in lines[0] and 'target fedmef <= 1.5x' in lines[0]


# -- faults: non-finite weights, damaged files, interrupted exports --------------------------------


def _one_error_line(text):
  # The TFLite runtime's own notices ('INFO: Created TensorFlow Lite delegate ...') aside.
  lines = [l for l in text.strip().splitlines() if l.strip() and not l.startswith('INFO: ')]
  assert len(lines) == 1, text
  assert lines[0].startswith(('export: error: ', 'verify: error: ')), lines[0]
  return lines[0]


def test_export_refuses_non_finite_weights(tmp_path):
  model = models.build_model('cnn', 'baseline', input_shape=INPUT_SHAPE, density=DENSITY, seed=1)
  kernel = model.trainable_variables[0]
  kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0, 0, 0]], [float('nan')]))
  out = tmp_path / 'm.tflite'
  with pytest.raises(export.ExportError, match=r'1 of \d+ values are NaN or infinite'):
    export.export_model(
      model,
      {'model': 'cnn', 'variant': 'baseline'},
      str(out),
      batch_size=BATCH,
      measure_memory=False,
    )
  assert os.listdir(tmp_path) == []


def test_weights_file_with_a_dataset_deleted_is_one_line_error(tmp_path):
  import h5py  # pylint: disable=import-outside-toplevel

  model = models.build_model('cnn', 'baseline', input_shape=INPUT_SHAPE, density=DENSITY, seed=1)
  model_dir = tmp_path / 'saved'
  model_io.save_model(
    model,
    {'model': 'cnn', 'variant': 'baseline', 'num_classes': 10, 'input_shape': list(INPUT_SHAPE)},
    str(model_dir),
  )
  with h5py.File(model_dir / model_io.WEIGHTS_FILE, 'r+') as f:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    del f[names[0]]
  out = tmp_path / 'm.tflite'
  rc, _, err = _run_export([f'--model_dir={model_dir}', f'--output={out}'])
  assert rc == 1
  assert 'weights do not fit' in _one_error_line(err) and 'KeyError' in err
  assert not out.exists()


def test_stale_temporaries_of_killed_exports_are_removed_live_ones_kept(tmp_path):
  dead = subprocess.Popen(['true'])
  dead.wait()
  out = tmp_path / 'm.tflite'
  stale = tmp_path / f'.m.tflite.{dead.pid}.abc123.tmp'
  live = tmp_path / f'.m.tflite.{os.getpid()}.def456.tmp'
  other = tmp_path / f'.other.tflite.{dead.pid}.abc123.tmp'
  for p in (stale, live, other):
    p.write_bytes(b'half')
  assert export.remove_stale_temporaries(str(out)) == [stale.name]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def _children(pid):
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          stat = f.read()
      except OSError:
        continue
      fields = stat[stat.rindex(')') + 2 :].split()
      if fields[1] == str(pid) and fields[0] != 'Z':
        found.append(int(entry))
  return found


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def test_memory_probe_dies_with_its_killed_parent(tmp_path):
  model = tmp_path / 'm.tflite'
  model.write_bytes(b'\0' * 64)
  code = 'import sys; from tflite_export import memprobe; memprobe.measure_train_peak(sys.argv[1])'
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  parent = subprocess.Popen(
    [sys.executable, '-c', code, str(model)],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 60
    probes = []
    while not probes and time.monotonic() < deadline and parent.poll() is None:
      probes = _children(parent.pid)
      time.sleep(0.01)
    assert probes, 'the probe subprocess was not seen'
  finally:
    parent.kill()
    parent.wait()
  deadline = time.monotonic() + 10
  while any(_alive(p) for p in probes) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not any(_alive(p) for p in probes), f'probe {probes} outlived its parent'


def test_ctrl_c_during_export_is_one_line_and_keeps_the_old_file(tmp_path):
  out = tmp_path / 'm.tflite'
  out.write_bytes(b'old')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'tflite_export.export',
      '--model=cnn',
      '--input_shape=16,16,3',
      f'--batch_size={BATCH}',
      f'--output={out}',
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(8)  # inside the export (TensorFlow imported, model being built or converted)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert 'interrupted' in _one_error_line(err)
  assert out.read_bytes() == b'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m.tflite']


def _verify_cli(path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
    [sys.executable, '-m', 'tflite_export.verify', str(path), '--steps=2'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


def test_verify_reports_damaged_files_in_one_line_without_crashing(baseline_export, tmp_path):
  data = open(baseline_export[0], 'rb').read()
  rng = np.random.RandomState(0)
  changed = bytearray(data)
  for i in rng.choice(np.arange(8, len(data)), 50, replace=False):
    changed[i] = rng.randint(256)
  random_tfl3 = bytearray(rng.bytes(4096))
  random_tfl3[0:4] = (16).to_bytes(4, 'little')
  random_tfl3[4:8] = b'TFL3'
  cases = {
    'half.tflite': data[: len(data) // 2],
    'changed.tflite': bytes(changed),
    'random.tflite': bytes(random_tfl3),
    'plain.tflite': rng.bytes(4096),
  }
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    proc = _verify_cli(path)
    assert proc.returncode == 2 or (name == 'changed.tflite' and proc.returncode == 1), (
      name,
      proc.returncode,
      proc.stderr,
    )
    if proc.returncode == 2:
      assert str(path) in _one_error_line(proc.stderr), name


def test_verify_refuses_non_finite_weights(tmp_path):
  model = models.build_model('cnn', 'baseline', input_shape=INPUT_SHAPE, density=DENSITY, seed=1)
  bias = model.trainable_variables[1]
  marker = np.float32(1234.5678)
  bias.assign(tf.tensor_scatter_nd_update(bias, [[0]], [marker]))
  path = tmp_path / 'm.tflite'
  export.export_model(
    model,
    {'model': 'cnn', 'variant': 'baseline', 'num_classes': 10, 'input_shape': list(INPUT_SHAPE)},
    str(path),
    batch_size=BATCH,
    measure_memory=False,
  )
  data = path.read_bytes()
  assert data.count(marker.tobytes()) == 1  # the bias's initial value, stored once
  path.write_bytes(data.replace(marker.tobytes(), np.float32(np.nan).tobytes()))
  with pytest.raises(ValueError, match='holds 1 NaN or infinite values'):
    verify.verify(str(path), steps=2)
  proc = _verify_cli(path)
  assert proc.returncode == 2 and 'NaN or infinite' in _one_error_line(proc.stderr)
