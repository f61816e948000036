"""Command-line plumbing shared by the programs (no TensorFlow needed).

* `Problems` collects every bad flag value of a command line, so that all of them are reported
  at once, in one line (`UsageError`);
* `round_defaults` and `resolve_defaults`: the flags whose defaults follow `--rounds` (the
  paper's proportions, ../shared/ALGORITHM.md: dT = R/50, T_end = 0.6 R);
* `flags_parser`, `UsageError` and the exit codes shared by every program (`EXIT_*`), from
  `fedmef_tf.flag_parsing`.
"""

import math
import textwrap
from typing import Any, Callable, Dict, List, Mapping, Sequence

from absl import flags

from fedmef_tf import flag_parsing

# The exit codes of every program of fedmef-tf (train, compare, worker, the benchmarks, the data
# writer and the TFLite tools), `UsageError` and `flags_parser` live in `fedmef_tf.flag_parsing`
# (which the TFLite tools use too) and are re-exported here.
EXIT_OK = flag_parsing.EXIT_OK
EXIT_FAILURE = flag_parsing.EXIT_FAILURE
EXIT_USAGE = flag_parsing.EXIT_USAGE
EXIT_INTERRUPTED = flag_parsing.EXIT_INTERRUPTED
EXIT_TERMINATED = flag_parsing.EXIT_TERMINATED
HELP_ARGS = flag_parsing.HELP_ARGS
UsageError = flag_parsing.UsageError
flags_parser = flag_parsing.flags_parser

# Flags whose default (None on the command line) is derived from --rounds by `round_defaults`.
ROUND_DERIVED = ('delta_t', 't_end', 'eval_every')


def _fmt(x) -> str:
  return f'{x:g}' if isinstance(x, float) else str(x)


class Problems:
  """Collects the problems of a command line; `raise_if_any` reports them all in one line."""

  def __init__(self):
    self.messages: List[str] = []

  def add(self, message: str) -> None:
    self.messages.append(message)

  def check_range(self, name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> bool:
    """Records `--name=value is out of range: must be in [lo, hi]` unless it is; returns ok."""
    ok = True
    if lo is not None:
      ok &= value > lo if lo_open else value >= lo
    if hi is not None:
      ok &= value < hi if hi_open else value <= hi
    if isinstance(value, float) and not math.isfinite(value):
      ok = False
    if not ok:
      left = '(' if lo_open else '['
      right = ')' if hi_open else ']'
      lo_s = _fmt(lo) if lo is not None else '-inf'
      hi_s = _fmt(hi) if hi is not None else 'inf'
      self.add(f'--{name}={_fmt(value)} is out of range: must be in {left}{lo_s}, {hi_s}{right}')
    return bool(ok)

  def check_choice(self, name: str, value: str, choices: Sequence[str]) -> bool:
    if value not in choices:
      self.add(f'--{name}={value!r} is not allowed: must be one of {", ".join(choices)}')
      return False
    return True

  def raise_if_any(self) -> None:
    """Raises `UsageError` with every recorded problem, joined by '; ', when there is one."""
    if self.messages:
      raise UsageError('; '.join(self.messages))


def _half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def round_defaults(rounds: int) -> Dict[str, int]:
  """The defaults of `ROUND_DERIVED` for a run of `rounds` rounds.

  `delta_t` = R/50 and `t_end` = 0.6 R (the paper's dT = 10, T_end = 300 at R = 500), and
  `eval_every` = R/8 (eight evaluations plus the last round), each rounded half up and at least
  1. For R = 40: 1, 24 and 5; for R = 500: 10, 300 and 63.
  """
  rounds = max(1, int(rounds))
  return {
    'delta_t': max(1, _half_up(rounds / 50)),
    't_end': min(rounds, max(1, _half_up(0.6 * rounds))),
    'eval_every': max(1, _half_up(rounds / 8)),
  }


def resolve_defaults(values: Mapping[str, Any]) -> Dict[str, Any]:
  """`values` with each `ROUND_DERIVED` flag that is None replaced by its `round_defaults`."""
  out = dict(values)
  missing = [n for n in ROUND_DERIVED if n in out and out[n] is None]
  if missing and isinstance(out.get('rounds'), int):
    derived = round_defaults(out['rounds'])
    for name in missing:
      out[name] = derived[name]
  return out


def _default_text(flag) -> str:
  if flag.name in ROUND_DERIVED and flag.default is None:
    return 'derived from --rounds'
  if isinstance(flag.default, bool):
    return 'true' if flag.default else 'false'
  if isinstance(flag.default, (list, tuple)):
    return ','.join(str(v) for v in flag.default)
  return repr(flag.default) if isinstance(flag.default, str) else _fmt(flag.default)


def flags_help(modules: Sequence[Any], flag_values=flags.FLAGS, skip: Sequence[str] = ()) -> str:
  """Help text of the flags defined by `modules` (module objects or names), with defaults."""
  lines = []
  seen = set(skip)
  for module in modules:
    for flag in sorted(flag_values.get_flags_for_module(module), key=lambda fl: fl.name):
      if flag.name in seen:
        continue
      seen.add(flag.name)
      lines.append(
        textwrap.fill(
          f'--{flag.name}: {flag.help}', width=100, initial_indent='  ', subsequent_indent='    '
        )
      )
      lines.append(f'    (default: {_default_text(flag)})')
  return '\n'.join(lines)


def program_help(doc: str, modules: Sequence[Any]) -> Callable[[], str]:
  """`help_text` for `flags_parser`: `doc` (a program's docstring), then the flags of `modules`."""
  return lambda: f'{(doc or "").strip()}\n\nFlags:\n{flags_help(modules)}'
