"""The DataFormat interface and the PreferencePair record it produces."""

from __future__ import annotations

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


class DataFormat(Configurable, ABC):
    """A data format plugin: recognises and parses one kind of record (one JSON object).

    ``detect`` must be cheap and must not raise; ``parse`` raises ``ValueError`` with a short
    message for a record it cannot use (the reader adds the file and line).
    """

    kind: ClassVar[str] = "data format"

    @classmethod
    @abstractmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        """Whether ``record`` looks like this format."""

    @abstractmethod
    def parse(self, record: dict[str, Any]) -> PreferencePair:
        """Turn a record into a PreferencePair."""
