"""Errors that mean "the user's input is wrong": entry points print them as one line, exit 2."""


class UserError(Exception):
  """Bad input (a path, a config value, a file): the message says what and how to fix it."""


class ConfigError(UserError):
  """An invalid config value; `key` is its dotted name."""

  def __init__(self, key: str, message: str):
    super().__init__(f'config.{key}: {message}')
    self.key = key
