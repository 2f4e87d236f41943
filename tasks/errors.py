"""Expected failures and progress lines: what every stage function may raise or emit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

# Where a stage function sends its progress lines: the Prefect run logger in a task, nothing by default.
Log = Callable[[str], None]


def quiet(_message: str) -> None:
    """Discard a log line (the default `log` of the stage functions)."""


class PipelineError(Exception):
    """An expected failure (bad input, failed check) whose message is meant for the user as is."""


def validation_problems(error: ValidationError) -> str:
    """Return a pydantic validation error as one line: each field, what is wrong, what was found."""
    def problem(e: Any) -> str:
        # A check across fields (a model validator) gets the whole section as input: its message names what it found.
        found = "" if e["type"] == "missing" or isinstance(e["input"], dict) else f" (found {repr(e['input'])[:80]})"
        return f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}{found}"

    return "; ".join(problem(e) for e in error.errors())
