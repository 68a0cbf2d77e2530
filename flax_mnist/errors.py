"""The package's error types (every user-facing failure is one line) and the one helper that
shortens a library's exception to such a line."""


class FlaxMnistError(Exception):
  """A problem with the user's input (config, data files, checkpoints, images)."""
  exit_code = 2


class ConfigError(FlaxMnistError):
  """An invalid configuration field."""


class DataError(FlaxMnistError):
  """A dataset or data file that cannot be used."""


class WorkdirError(FlaxMnistError):
  """A --workdir (or --output folder) that cannot be used: not a folder, not writable, busy."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """'Type: first line of the message', at most `limit` characters: how a library's exception
  is quoted inside one of our one-line errors."""
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:limit]
