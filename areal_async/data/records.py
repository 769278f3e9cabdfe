"""Record types shared by the prompt-file loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from areal_async.errors import InputError


@dataclass(frozen=True)
class PromptRecord:
    """One training or evaluation prompt with its gold answers.

    Attributes:
        query_id: Identifier, unique within the file it was read from.
        prompt: The text the model is given (already templated, if a template was used).
        solutions: Gold answers, either ``"\\boxed{...}"``-wrapped or bare; a response is
            correct if it matches any of them.
        task: The task family: ``"math"``, ``"stem"`` or ``"code"``.
    """

    query_id: str
    prompt: str
    solutions: tuple[str, ...]
    task: str = "math"


class DatasetError(InputError):
    """A prompt file's content is invalid.

    The message starts with the file and, where one applies, the 1-based line number,
    e.g. ``prompts.jsonl:17: missing key 'prompt'``.

    Attributes:
        path: The file the problem was found in.
        line: The 1-based line number, or None when the problem concerns the whole file.
        reason: The message without the file and line prefix.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        location = str(self.path) if line is None else f"{self.path}:{line}"
        super().__init__(f"{location}: {reason}")

    def __reduce__(self):
        """Rebuild from the constructor arguments, so the error survives pickling (e.g. Ray)."""
        return (type(self), (self.path, self.line, self.reason))
