"""Errors that many modules raise; a leaf module, so raising one imports nothing else of jaxlm."""


class JaxlmError(Exception):
  """The base of every expected error: a bad config, a missing file, a run that cannot go on.

  The message is one line naming the key, file or flag and the fix; the `jaxlm` command prints it and exits 2
  instead of showing a traceback (`jaxlm.cli.commands`). Each subclass also keeps the builtin base it had
  (ValueError, RuntimeError), so `except` clauses written for those still catch it.
  """

  # True when work that cannot finish still holds threads that would keep the interpreter from exiting (a save
  # into a bucket that stopped answering): the command then ends the process at once after reporting.
  holds_threads = False


class ConfigError(JaxlmError, ValueError):
  """A bad config value; the message is one line naming the key and the fix (`jaxlm.config.ConfigError`)."""
