"""The DataFormat interface and the records it produces: PreferencePair (preference training)
and Demonstration (supervised fine-tuning)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Union

from dpo.core.interfaces.options import Configurable

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


@dataclass(frozen=True)
class Demonstration:
    """One demonstration for supervised fine-tuning: a prompt and the completion to learn.

    Each field is plain text or a list of chat messages. A completion of several messages (a
    conversation going on after the prompt) trains the assistant messages only; the other
    roles' turns in it are context.
    """

    prompt: Text
    completion: Text


@dataclass(frozen=True)
class LabeledCompletion:
    """One unpaired example: a prompt, one completion and whether it is desirable (``label``
    true) or undesirable (false), for losses over unpaired data such as KTO.

    ``prompt`` and ``completion`` are plain text or lists of chat messages, as in a
    ``Demonstration``.
    """

    prompt: Text
    completion: Text
    label: bool


#: What ``DataFormat.parse`` returns.
Record = Union[PreferencePair, Demonstration, LabeledCompletion]


class UnusableRecord(ValueError):
    """A well-formed record that holds nothing to learn from.

    ``parse`` raises it for a record of the right shape that cannot be trained on (an empty
    completion, chosen identical to rejected, no prompt the two completions share, a
    conversation without an assistant reply...). The reader drops such records and counts them
    per ``reason`` (``dropped_<reason>`` in the data counts), or stops at the first one under
    ``--strict``. ``reason`` is short and machine-friendly, lower-case words joined by
    underscores; the built-in reasons shared with tokenisation are ``empty`` (a completion with
    nothing in it), ``empty_prompt``, ``identical`` and ``no_assistant``.
    """

    def __init__(self, reason: str, message: str):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", reason):
            raise ValueError(f"UnusableRecord reason {reason!r} must be lower_case_words")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickles (e.g. across worker processes) with both arguments
        return type(self), (self.reason, str(self))


class DataFormat(Configurable, ABC):
    """A data format plugin: recognises and parses one kind of record, and may read files.

    ``parse`` turns a record into a ``PreferencePair`` (two completions, one preferred: what
    ``dpo run`` trains on), a ``Demonstration`` (one completion to imitate: what ``dpo sft``
    trains on) or a ``LabeledCompletion`` (one completion labelled desirable or not: what
    ``dpo run --loss kto`` trains on). Supervised fine-tuning also takes pairs, training on their chosen side;
    preference training refuses demonstrations, which have no rejected completion.

    Records are dicts. By default they come from JSONL files (one JSON object per line, ``.gz``
    too) or Hugging Face datasets, and the format is picked per file by ``detect`` on the first
    record unless ``--format`` names it.

    ``detect`` must be cheap and must not raise. ``parse`` raises, with a short message (the
    reader adds the file and line):

    * ``UnusableRecord(reason, message)`` for a well-formed record that cannot be trained on:
      it is dropped and counted, or refused under ``--strict``;
    * ``ValueError`` (or ``KeyError`` / ``TypeError``) for malformed input (a missing field, a
      wrong type): always an error, since the file needs fixing.

    Reading files of its own (TSV, Parquet, ...): set ``suffixes`` to the file-name endings the
    format reads (lower case, e.g. ``(".tsv", ".tsv.gz")``) and implement the classmethod
    ``read(path)``, which yields ``(line, record)`` pairs: ``line`` is the 1-based line (or, in a
    binary file, row) the record starts on, so that errors can name it. A ``--data`` file whose
    name ends with one of the suffixes is read by that format's ``read`` and parsed by its
    ``parse``, without detection; ``--format NAME`` uses NAME's ``read`` for any file name. A
    file no format claims is read as JSONL. ``read`` is called once per file and should stream.
    For malformed input it raises ``dpo.DataError(message, line=n)`` (the reader adds the file)
    or ``ValueError``; anything it raises reaches the user as one line with the file and the
    line after the last record read, never a traceback. Two formats claiming one suffix is an
    error when such a file is read: pick one with ``--format``.
    """

    kind: ClassVar[str] = "data format"
    #: File-name endings this format reads itself with ``read`` (empty: JSON records only).
    suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        """Whether ``record`` looks like this format."""

    @abstractmethod
    def parse(self, record: dict[str, Any]) -> Record:
        """Turn a record into a PreferencePair, a Demonstration or a LabeledCompletion."""

    @classmethod
    def registration_problem(cls) -> str | None:
        """Why this class cannot be registered as a data format (``None``: it can)."""
        if not (isinstance(cls.suffixes, tuple) and all(
                isinstance(x, str) and x.startswith(".") and x == x.lower() for x in cls.suffixes)):
            return ("suffixes must be a tuple of lower-case file-name endings such as '.tsv', "
                    f"got {cls.suffixes!r}")
        if cls.suffixes and not cls.reads_files():
            return (f"it claims the suffixes {', '.join(cls.suffixes)} but does not implement "
                    "read(path)")
        return None

    @classmethod
    def reads_files(cls) -> bool:
        """Whether this format reads files itself (it overrides ``read``)."""
        # A classmethod's function, or a staticmethod's (which has no __func__).
        base = DataFormat.read.__func__  # type: ignore[attr-defined]
        return getattr(cls.read, "__func__", cls.read) is not base

    @classmethod
    def read(cls, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line, record) for each record of the file at ``path``; see the class docstring.
        The base class reads no files: JSONL is read by ``dpo.core.data.reading``."""
        raise NotImplementedError(f"data format {cls.name!r} does not read files")


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the user wrote it in the file (for messages)."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)
