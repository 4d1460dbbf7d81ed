"""The two failures a user can act on; job scripts turn them into one ``ERROR:`` line (cli.run)."""


class JobError(RuntimeError):
    """A failure with a clear cause that the user can act on (no traceback needed)."""


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""
