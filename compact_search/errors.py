"""User-facing errors.

`UserInputError` is what bad files, bad arguments and impossible requests raise: the CLI turns it
into one line on stderr and exit code 2. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from a user: a file, an option, a geometry that does not fit. Exit code 2."""


class ConfigError(UserInputError):
    """A config file that cannot be loaded: names the file, the field and what was expected."""

    def __init__(self, source: str, field: str, problem: str):
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: {field}: {problem}")
