"""Errors that mean "the user asked for something wrong": the CLI prints one line for these."""


class UserError(Exception):
    """Bad input: unknown plugin, bad config key, missing file, incompatible combination."""


class ConfigError(UserError):
    """A config key, type or value that is not allowed."""


class UnknownPluginError(UserError):
    """A plugin name that no installed distribution registers."""


class IncompatiblePluginsError(UserError):
    """A combination whose plugins do not provide what the others need."""


class DataError(UserError):
    """A missing or corrupt file."""


class TrainingDiverged(UserError):
    """A non-finite loss; the last good checkpoint is kept."""
