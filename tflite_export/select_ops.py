"""Which select-TF (Flex) operators a TFLite file needs, read from its flatbuffer.

A TFLite file converted with `SELECT_TF_OPS` allowed keeps every TensorFlow op the converter
could not lower to a builtin as a custom operator whose custom code is `Flex<TF op name>`
(for example `FlexConv2DBackpropFilter`). Such a file runs only where the select-TF-ops
runtime is linked (on Android the `tensorflow-lite-select-tf-ops` library; the Python
`tf.lite.Interpreter` has it, stock LiteRT `ai_edge_litert.interpreter` has not). A file with no
`Flex` operator runs on the stock LiteRT runtime.

The file is parsed with LiteRT's own flatbuffer schema (`ai_edge_litert.schema_py_generated`,
or TensorFlow's copy of it where LiteRT is not installed); nothing is run.

* `select_tf_ops(flatbuffer)`: the sorted TF op names of all `Flex` operators used anywhere in
  the file.
* `select_tf_ops_by_signature(flatbuffer)`: the same per signature, counting the subgraphs a
  signature's subgraph reaches through control flow (`WHILE`, `IF`, `CALL_ONCE`, the last one
  initialising resource variables).
"""

from __future__ import annotations

from typing import Dict, List, Set

__all__ = ['FLEX_PREFIX', 'select_tf_ops', 'select_tf_ops_by_signature']

#: Custom code prefix of a select-TF operator in a TFLite file.
FLEX_PREFIX = 'Flex'


def _schema():
  # pylint: disable=import-outside-toplevel
  try:
    from ai_edge_litert import schema_py_generated
  except ImportError:  # the same generated schema, as TensorFlow ships it
    from tensorflow.lite.python import schema_py_generated
  return schema_py_generated


def _model(flatbuffer: bytes):
  schema = _schema()
  data = bytearray(flatbuffer)
  if len(data) < 8 or bytes(data[4:8]) != b'TFL3':
    raise ValueError('not a TFLite flatbuffer (no TFL3 identifier)')
  return schema, schema.Model.GetRootAs(data, 0)


def _opcode_names(schema, model) -> List[str]:
  """Per operator code: the builtin name, or the custom code for a custom operator."""
  builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
  names = []
  for i in range(model.OperatorCodesLength()):
    code = model.OperatorCodes(i)
    # Builtin codes above 127 live in `BuiltinCode`; older files fill only the deprecated field.
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == schema.BuiltinOperator.CUSTOM:
      custom = code.CustomCode()
      names.append(custom.decode() if custom is not None else '')
    else:
      names.append(builtin_names.get(builtin, str(builtin)))
  return names


def _called_subgraphs(schema, op, opname: str) -> List[int]:
  """Subgraph indices that a control flow operator runs."""
  table = op.BuiltinOptions()
  if table is None:
    return []
  if opname == 'WHILE':
    options = schema.WhileOptions()
    options.Init(table.Bytes, table.Pos)
    return [options.CondSubgraphIndex(), options.BodySubgraphIndex()]
  if opname == 'IF':
    options = schema.IfOptions()
    options.Init(table.Bytes, table.Pos)
    return [options.ThenSubgraphIndex(), options.ElseSubgraphIndex()]
  if opname == 'CALL_ONCE':
    options = schema.CallOnceOptions()
    options.Init(table.Bytes, table.Pos)
    return [options.InitSubgraphIndex()]
  return []


def _subgraph_ops(schema, model, names: List[str]):
  """Per subgraph: (operator names, called subgraph indices)."""
  out = []
  for s in range(model.SubgraphsLength()):
    subgraph = model.Subgraphs(s)
    ops, calls = set(), set()
    for o in range(subgraph.OperatorsLength()):
      op = subgraph.Operators(o)
      opname = names[op.OpcodeIndex()]
      ops.add(opname)
      calls.update(_called_subgraphs(schema, op, opname))
    out.append((ops, calls))
  return out


def _flex(ops: Set[str]) -> List[str]:
  return sorted(o[len(FLEX_PREFIX) :] for o in ops if o.startswith(FLEX_PREFIX))


def select_tf_ops(flatbuffer: bytes) -> List[str]:
  """TF op names (without the `Flex` prefix) of the select-TF operators of a TFLite file.

  Args:
    flatbuffer: the bytes of a `.tflite` file.

  Returns:
    Sorted, unique names; empty if the file runs on the stock LiteRT runtime.

  Raises:
    ValueError: the bytes are not a TFLite flatbuffer.
  """
  schema, model = _model(flatbuffer)
  names = _opcode_names(schema, model)
  used = set()
  for ops, _ in _subgraph_ops(schema, model, names):
    used |= ops
  return _flex(used)


def select_tf_ops_by_signature(flatbuffer: bytes) -> Dict[str, List[str]]:
  """`{signature key: TF op names of the select-TF operators it runs}`, including the
  subgraphs its own subgraph calls (`WHILE`, `IF`, `CALL_ONCE`).

  Raises:
    ValueError: the bytes are not a TFLite flatbuffer.
  """
  schema, model = _model(flatbuffer)
  names = _opcode_names(schema, model)
  subgraphs = _subgraph_ops(schema, model, names)
  out = {}
  for i in range(model.SignatureDefsLength()):
    signature = model.SignatureDefs(i)
    todo, seen, ops = [signature.SubgraphIndex()], set(), set()
    while todo:
      s = todo.pop()
      if s in seen or not 0 <= s < len(subgraphs):
        continue
      seen.add(s)
      ops |= subgraphs[s][0]
      todo.extend(subgraphs[s][1])
    out[signature.SignatureKey().decode()] = _flex(ops)
  return out
