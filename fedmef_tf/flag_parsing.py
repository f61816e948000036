"""absl flag parsing shared by every program of fedmef-tf (no TensorFlow import).

* the exit codes of every program (`EXIT_*`; README "Exit codes");
* `UsageError`: bad flag values, reported in one line;
* `flags_parser`: an absl `flags_parser` that answers `--help` on stdout with exit code 0, and
  turns every parse or check error into one line `<program>: error: ...` with exit code 2;
* `run_tool`: `app.run` of a program with that parser (the TFLite tools).

`tff_programs.cli` re-exports these names for the TFF programs and adds the checks and defaults
of the training flags; the TFLite tools (`tflite_export`), which import no TFF program, use this
module directly.
"""

import faulthandler
import importlib
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import flags

EXIT_OK = 0  # done
EXIT_FAILURE = 1  # failed while running (disk full, a worker lost, no client used, ...)
EXIT_USAGE = 2  # bad flag, unusable run directory or data files
EXIT_INTERRUPTED = 130  # stopped by SIGINT (128 + 2); rerun to resume
EXIT_TERMINATED = 143  # stopped by SIGTERM (128 + 15; tff_programs.runtime); rerun to resume
HELP_ARGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull')
#: Environment variable that asks for TensorFlow's and the TFF worker's log lines ('1'; README
#: "Quiet console"); `tff_programs.runtime.configure_logging(True)` sets it for child processes.
VERBOSE_ENV = 'FEDMEF_VERBOSE'


def verbose_from_environment() -> bool:
  """Whether `VERBOSE_ENV` asks for logs (set and not '0')."""
  return os.environ.get(VERBOSE_ENV, '') not in ('', '0')


class UsageError(Exception):
  """Bad flag values (one-line message naming each flag and its allowed range)."""


def first_line(e: BaseException) -> str:
  """The first line of `e`'s message, or its type's name when it has none."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def flags_parser(
  program: str,
  help_text: Callable[[], str],
  check: Optional[Callable[[Dict[str, Any]], None]] = None,
  flag_values=flags.FLAGS,
  positional: Sequence[str] = (),
  preload: Sequence[str] = (),
) -> Callable[[List[str]], List[str]]:
  """An absl `flags_parser` for `program`.

  Args:
    program: the name errors begin with (`<program>: error: ...`).
    help_text: returns what `--help` prints (on stdout, then exit code 0).
    check: called with the parsed flag values; raises `UsageError` on bad values.
    flag_values: the absl flag registry.
    positional: the names of the positional arguments the program takes, each required
      (`('MODEL',)`: `program MODEL --flag=...`); none by default.
    preload: modules imported once the command line is valid, before absl calls `main`
      (`('tensorflow',)`). A program that builds Keras functional models needs TensorFlow
      imported here: imported for the first time inside absl's `main`, Keras makes graph
      placeholders instead of Keras tensors for `tf.keras.Input`, and building the model fails
      ("'SymbolicTensor' object has no attribute 'node'"; TensorFlow 2.14, Keras 2.14, absl
      2.x, seen on these machines), unless `TF2_BEHAVIOR=1` is in the environment, which a
      process that imported TensorFlow passes to the programs it starts (tests/conftest.py).
      TensorFlow reads its C++ log level once, when it is first imported, so before the
      preload `TF_CPP_MIN_LOG_LEVEL` is set to 3 (errors only) unless the environment sets it
      or asks for TensorFlow's log lines (`FEDMEF_VERBOSE=1`, README "Quiet console").
      `--help` and bad command lines import nothing.

  Returns:
    `parse(argv) -> remaining argv` (the program name, then the positional arguments); exits
    with code 2 and one line on stderr on a bad flag, a missing or unexpected positional
    argument or a `UsageError` of `check`.
  """

  def parse(argv: List[str]) -> List[str]:
    args = list(argv[1:])
    if '--' in args:
      args = args[: args.index('--')]
    if any(a in HELP_ARGS for a in args):
      print(help_text())
      sys.exit(EXIT_OK)
    try:
      rest = flag_values(argv)
    except flags.Error as e:
      print(f'{program}: error: {first_line(e)}', file=sys.stderr)
      sys.exit(EXIT_USAGE)
    if len(rest) - 1 < len(positional):
      missing = ' '.join(positional[len(rest) - 1 :])
      print(f'{program}: error: missing arguments: {missing}', file=sys.stderr)
      sys.exit(EXIT_USAGE)
    if len(rest) - 1 > len(positional):
      extra = ' '.join(rest[1 + len(positional) :])
      print(f'{program}: error: unexpected arguments: {extra}', file=sys.stderr)
      sys.exit(EXIT_USAGE)
    if check is not None:
      try:
        check(flag_values.flag_values_dict())
      except UsageError as e:
        print(f'{program}: error: {e}', file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if preload and not verbose_from_environment():
      os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    for module in preload:
      importlib.import_module(module)
    return rest

  return parse


def run_tool(
  main: Callable[[List[str]], int],
  program: str,
  doc: str,
  *,
  check: Optional[Callable[[Dict[str, Any]], None]] = None,
  positional: Sequence[str] = (),
  crash_dump: bool = True,
  preload: Sequence[str] = (),
) -> None:
  """Runs `main` as the program `program` with absl's `app.run` and `flags_parser`.

  `--help` prints `doc` and the flags of the main module. absl's `app.run` turns Python's
  `faulthandler` on; `crash_dump=False` turns it off again before `main` runs, for a child
  process whose crash its parent reports in one line (a traceback dump would come on top).
  `preload` is passed to `flags_parser`.
  """
  from absl import app  # pylint: disable=import-outside-toplevel

  def run_main(argv: List[str]) -> int:
    if not crash_dump:
      faulthandler.disable()
    return main(argv)

  app.run(
    run_main,
    flags_parser=flags_parser(
      program,
      lambda: f'{doc.strip()}\n\nFlags:\n{flags.FLAGS.main_module_help()}',
      check,
      positional=positional,
      preload=preload,
    ),
  )
