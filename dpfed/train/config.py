"""Config validation shared by the trainers: a bad field raises ConfigError naming it.

Binaries turn a ConfigError into `cli.FlagError(error.field, error.message)`: exit code 2
and one line naming the flag.
"""


class ConfigError(ValueError):
    """A config field has a value the run cannot use; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def require(condition: bool, field: str, message: str) -> None:
    """Raises ConfigError(field, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(field, message)
