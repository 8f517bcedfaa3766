"""One exception family. User errors are printed by the CLI as one line, without a traceback."""


class LorafuseError(Exception):
    """Base of every error lorafuse raises on purpose."""


class UserInputError(LorafuseError):
    """Bad input from the user: a path, a name, an option. The message names the thing and the problem."""


class LoraFormatError(UserInputError):
    """A LoRA file that cannot be read or does not fit the base model."""


class ConfigError(UserInputError):
    """A config file with unknown keys or wrong types."""


class OutputError(UserInputError):
    """An output path that cannot be written: wrong kind, not writable, or no space left."""
