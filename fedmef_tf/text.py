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
