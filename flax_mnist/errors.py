"""The package's own error type: every user-facing failure is one of these, one line long."""


class FlaxMnistError(Exception):
  """A problem with the user's input (config, data files, checkpoints, images)."""


class ConfigError(FlaxMnistError):
  """An invalid configuration field."""


class DataError(FlaxMnistError):
  """A dataset or data file that cannot be used."""
