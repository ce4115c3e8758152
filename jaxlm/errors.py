"""Errors that many modules raise; a leaf module, so raising one imports nothing else of jaxlm."""


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the key and the fix (`jaxlm.config.ConfigError`)."""
