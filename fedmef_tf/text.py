"""Text helpers for one-line messages (no TensorFlow import)."""


def one_line(text: str) -> str:
  """`text` made fit for a one-line message.

  Control characters (a newline in a file name, ...) are written as Python escapes (`\\n`),
  and bytes of a file name that are not UTF-8 (which Python decodes to lone surrogates, see
  `os.fsdecode`) as `\\xNN`.
  """
  out = []
  for ch in text:
    if 0xDC80 <= ord(ch) <= 0xDCFF:
      out.append(f'\\x{ord(ch) - 0xDC00:02x}')
    elif ch.isprintable():
      out.append(ch)
    else:
      out.append(ch.encode('unicode_escape').decode('ascii'))
  return ''.join(out)


_BYTE_UNITS = ('B', 'KiB', 'MiB', 'GiB', 'TiB')


def format_bytes(n, unit=None, precision: int = 1) -> str:
  """`n` bytes in binary units, for consoles and tables: '512 B', '12.3 KiB', '4.5 MiB'.

  Args:
    n: a number of bytes; None or NaN give '-'.
    unit: one of 'B', 'KiB', 'MiB', 'GiB', 'TiB' to write every value in the same unit (a
      table column); None picks the largest unit in which `abs(n)` is at least 1.
    precision: digits after the decimal point (none for whole bytes).

  Returns:
    The value and its unit, separated by a space.
  """
  if n is None or n != n:  # NaN is the one value not equal to itself.
    return '-'
  n = float(n)
  if unit is None:
    power = 0
    while power < len(_BYTE_UNITS) - 1 and abs(n) >= 1024.0 ** (power + 1):
      power += 1
  elif unit in _BYTE_UNITS:
    power = _BYTE_UNITS.index(unit)
  else:
    raise ValueError(f'unit must be one of {_BYTE_UNITS} or None, got {unit!r}')
  if power == 0:
    return f'{n:.0f} B'
  return f'{n / 1024.0**power:.{precision}f} {_BYTE_UNITS[power]}'


def format_seconds(seconds: float) -> str:
  """A duration, rounded to whole seconds: '42s', '3m07s', '2h05m'."""
  s = max(0, int(round(seconds)))
  if s >= 3600:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  if s >= 60:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s}s'


class SettingNames:
  """How a message names a setting: as a keyword of the library or as a program's flag.

  Library code writes its messages with one of these, given by its caller, so that the same
  error reads `rounds=40` to a library user (`KEYWORDS`) and `--rounds=40` on a program's
  command line (`FLAGS`).

  Args:
    prefix: written before each name ('' for keywords, '--' for absl flags).
  """

  def __init__(self, prefix: str):
    self.prefix = prefix

  def name(self, key: str) -> str:
    """The setting `key` itself: 'rounds' or '--rounds'."""
    return f'{self.prefix}{key}'

  def setting(self, key: str, value) -> str:
    """The setting with a value: 'rounds=40' or '--rounds=40'."""
    return f'{self.prefix}{key}={value}'


#: Settings named as the library's keyword arguments and configuration keys.
KEYWORDS = SettingNames('')
#: Settings named as the programs' absl flags.
FLAGS = SettingNames('--')
