"""The project's user-error types. The command-line entry points catch `UserError` alone: it prints one
message (naming the file, row, field, flag or checkpoint, and what to do) and exits with status 2.
Anything else is a bug in rm_trainer, torch or DeepSpeed and keeps its traceback.

They subclass ValueError so that library callers who caught ValueError before keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix: a config value, a data row, a damaged checkpoint, a size."""


class ConfigError(UserError):
    """A user error in the run config. Carries every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the run configuration:\n{lines}")

    def __reduce__(self):  # survives the trip back from a datasets.map worker process
        return (type(self), (self.problems,))


class DataError(UserError):
    """A preference source that cannot be used as it is (file, row and field named)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or cannot be resumed exactly (the file or field named)."""
