"""Config problems by dotted key, and the one error that carries them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config, at a dotted key such as `network.rank` or `sample.prompts[0].width`."""

    key: str  # "" when the problem is the file as a whole (unreadable, YAML syntax)
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(Exception):
    """Every problem found in a config, raised together; str() is the message to show the user."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.problems, source)

    def __str__(self) -> str:
        count = len(self.problems)
        where = f" {self.source}" if self.source else ""
        head = f"invalid config{where} ({count} problem{'' if count == 1 else 's'}):"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])
