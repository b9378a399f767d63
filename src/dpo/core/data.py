"""The DataFormat interface and the PreferencePair record it produces."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from dpo.core.options import Configurable

Messages = list[dict[str, str]]
Text = Union[str, Messages]


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: a prompt and two completions, the chosen one preferred.

    Each field is plain text or a list of chat messages (``{"role": ..., "content": ...}``).
    """

    prompt: Text
    chosen: Text
    rejected: Text


class UnusableRecord(ValueError):
    """A well-formed record that holds no preference to learn from.

    ``parse`` raises it for a record of the right shape that cannot be trained on (an empty
    completion, chosen identical to rejected, no prompt the two completions share...). The reader
    drops such records and counts them per ``reason`` (``dropped_<reason>`` in the data counts),
    or stops at the first one under ``--strict``. ``reason`` is short and machine-friendly,
    lower-case words joined by underscores; the built-in reasons, shared with tokenisation, are
    ``empty`` (a completion with nothing in it), ``empty_prompt`` and ``identical``.
    """

    def __init__(self, reason: str, message: str):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", reason):
            raise ValueError(f"UnusableRecord reason {reason!r} must be lower_case_words")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickles (e.g. across worker processes) with both arguments
        return type(self), (self.reason, str(self))


class DataFormat(Configurable, ABC):
    """A data format plugin: recognises and parses one kind of record (one JSON object).

    ``detect`` must be cheap and must not raise. ``parse`` raises, with a short message (the
    reader adds the file and line):

    * ``UnusableRecord(reason, message)`` for a well-formed record that cannot be trained on:
      it is dropped and counted, or refused under ``--strict``;
    * ``ValueError`` (or ``KeyError`` / ``TypeError``) for malformed input (a missing field, a
      wrong type): always an error, since the file needs fixing.
    """

    kind: ClassVar[str] = "data format"

    @classmethod
    @abstractmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        """Whether ``record`` looks like this format."""

    @abstractmethod
    def parse(self, record: dict[str, Any]) -> PreferencePair:
        """Turn a record into a PreferencePair."""


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the user wrote it in the file (for messages)."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)
