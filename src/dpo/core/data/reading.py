"""Records from JSONL files (or hub datasets, or a format's own reader): reading, format
detection, dropping unusable records and the held-out split.

The rest of the path: ``dpo.core.data.tokenization`` (text or chat messages -> token ids,
truncation, drops) and ``dpo.core.data.batching`` (padding into tensors, the deterministic
per-rank batch order).
"""

from __future__ import annotations

import gzip
import json
import numbers
import zlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from dpo.core.interfaces.data_format import (
    DataFormat, Demonstration, LabeledCompletion, PreferencePair, Record, UnusableRecord)
from dpo.core.interfaces.errors import DataError, UsageError, first_line
from dpo.core.interfaces.registry import Registry
from dpo.core.data.stats import STRICT_HINT, DataStats


T = TypeVar("T")


@dataclass(frozen=True)
class SourcedPair:
    """A parsed pair and where it came from, so later errors and drops can name the line."""

    pair: PreferencePair
    path: str
    line: int


@dataclass(frozen=True)
class SourcedDemonstration:
    """A demonstration (or a pair's chosen side) and where it came from, like ``SourcedPair``."""

    demonstration: Demonstration
    path: str
    line: int


@dataclass(frozen=True)
class SourcedUnpaired:
    """An unpaired example (a completion labelled desirable or not) and where it came from."""

    example: LabeledCompletion
    path: str
    line: int


NO_SUCH_FILE = "no such file; check the path given to --data"
# Suffixes that say the user meant a local file, so a missing one is not looked up on the hub.
FILE_SUFFIXES = (".jsonl", ".json", ".gz")


def read_records(path: str | Path,
                 reader: type[DataFormat] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) for each non-blank line of a JSONL file (``.gz``: gzip),
    or, with ``reader``, for each record that data format's ``read`` yields from the file.

    Streams line by line. A missing file fails here, at the call; a bad line fails when reached.
    A ``path`` that does not exist is read as a Hugging Face dataset name (``name`` or
    ``name:split``, split ``train`` by default) when the optional ``datasets`` package is
    installed: its rows are the records, numbered from 1.
    """
    p = Path(path)
    if not p.exists():
        if reader is not None:  # a file in a format's own layout: nothing to look up on the hub
            raise DataError(NO_SUCH_FILE, str(path))
        return _hub_records(str(path))
    if not p.is_file():
        raise DataError("not a file; --data takes a .jsonl or .jsonl.gz file", str(path))
    if reader is not None:
        return _format_records(reader, p, str(path))
    return _records(p, str(path))


def _format_records(reader: type[DataFormat], p: Path,
                    shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``reader.read(p)``, checked, with whatever it raises turned into one line naming the
    file and the line (its own, or the one after the last record read)."""
    line = 0
    records = None
    try:
        records = iter(reader.read(p))
        for item in records:
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[0], numbers.Integral) and isinstance(item[1], dict)):
                raise DataError(f"{reader.name} format: read() must yield (line number, dict) "
                                f"pairs, got {type(item).__name__}; a bug in the data format "
                                "plugin", shown, line + 1)
            line = int(item[0])  # e.g. a numpy row number
            yield line, item[1]
    except DataError as exc:
        if exc.path:  # already names a file
            raise
        message = str(exc)
        raise DataError(f"{reader.name} format: {message}", shown, exc.line or line + 1) from None
    except Exception as exc:  # a third-party reader: never a traceback
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{reader.name} format cannot read it ({type(exc).__name__}: {text})",
                        shown, line + 1) from None
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()


def _records(p: Path, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    gzipped = p.suffix == ".gz"
    opener = gzip.open if gzipped else open
    line = 0
    try:
        # Bytes, decoded line by line, so an encoding error names its exact line.
        with opener(p, "rb") as handle:
            for line, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
                    if not text.strip():
                        continue
                    record = _parse_line(text, shown, line)
                except (UnicodeDecodeError, DataError) as exc:
                    # Damaged compressed data decompresses to garbage before its checksum is
                    # reached: say the file is damaged rather than blame the line.
                    if gzipped and (damage := _gzip_damage(p)):
                        raise DataError(_damaged(damage, line - 1), shown) from None
                    if isinstance(exc, DataError):
                        raise
                    raise DataError("not UTF-8 text; save the file as UTF-8", shown, line) from None
                yield line, record
    except gzip.BadGzipFile as exc:
        if line == 0 and "Not a gzipped file" in str(exc):
            raise DataError("not gzip data, though its name ends in .gz; compress it with gzip, "
                            "or drop the .gz from its name", shown) from None
        raise DataError(_damaged(str(exc), line), shown) from None
    except (EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream
        raise DataError(_damaged(str(exc), line), shown) from None
    except OSError as exc:
        raise DataError(f"cannot read it ({exc.strerror or exc}); check that it is a readable "
                        "file", shown) from None


def _damaged(reason: str, lines_read: int) -> str:
    where = f" after line {lines_read}" if lines_read else ""
    return (f"damaged gzip data{where} ({reason}); the file is truncated or corrupt: "
            "copy or compress it again")


def _gzip_damage(p: Path) -> str | None:
    """Why the gzip file ``p`` is damaged (read to its end, checksum included), or None."""
    try:
        with gzip.open(p, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        return str(exc)
    return None


def _hub_records(value: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of the hub dataset ``name[:split]``; loaded (downloaded) here, at the call."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{NO_SUCH_FILE} (or install dpo-trainer[datasets] to read a hub "
                        "dataset by name)", value) from None
    if Path(value).is_absolute() or value.endswith(FILE_SUFFIXES):
        raise DataError(NO_SUCH_FILE, value)
    name, _, split = value.partition(":")  # hub names have no ":"; a split may ("train[:10%]")
    split = split or "train"
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name or split, gated, ...: all one line to the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"no such file, and no Hugging Face dataset {name!r} with split {split!r} "
                        f"could be loaded ({reason}); check the path or the dataset name",
                        value) from None
    return _rows(rows, value)


def _rows(rows: Any, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"expected a row of named columns, got {type(row).__name__}",
                            shown, line)
        yield line, row


def _parse_line(text: str, path: str, line: int) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg}, column {exc.colno}); each line must hold "
                        "exactly one JSON object", path, line) from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}; each line must "
                        'hold one object such as {"prompt": ..., "chosen": ..., "rejected": ...}',
                        path, line)
    return record


def load_pairs(path: str | Path, formats: Registry[DataFormat], format_name: str | None = None,
               options: dict[str, Any] | None = None, *, strict: bool = False,
               stats: DataStats | None = None,
               options_by_format: Mapping[str, dict[str, Any]] | None = None) -> list[SourcedPair]:
    """Every usable record of ``path`` parsed into a PreferencePair, for preference training.

    The format is ``format_name`` when given, otherwise the format whose ``suffixes`` end the
    file's name, otherwise the first format (by name) whose ``detect`` accepts the file's first
    record; one format serves the whole file. A format that reads files itself
    (``DataFormat.read``) reads it; any other file is read as JSONL. ``options``
    are the format's ``-o`` values; ``options_by_format`` (format name -> values) serves instead
    when the format is detected, so each format takes its own.

    A malformed record (a missing field, a wrong type) fails with its file and line, and so does
    a Demonstration (it has no rejected completion to prefer the chosen one to). A record the
    format finds unusable (``UnusableRecord``) is dropped and counted per reason in ``stats``
    (pass a DataStats to see the counts, then hand it to ``tokenize_pairs``); with ``strict`` it
    fails with its file and line instead.
    """
    counts = None if stats is None else stats.counting("pairs")
    return _load(path, formats, format_name, options, strict, counts, options_by_format, _as_pair)


def load_demonstrations(path: str | Path, formats: Registry[DataFormat],
                        format_name: str | None = None, options: dict[str, Any] | None = None, *,
                        strict: bool = False, stats: DataStats | None = None,
                        options_by_format: Mapping[str, dict[str, Any]] | None = None
                        ) -> list[SourcedDemonstration]:
    """Every usable record of ``path`` as a Demonstration, for supervised fine-tuning.

    Read, detected, dropped and refused exactly as by ``load_pairs``. A record parsed into a
    PreferencePair becomes ``Demonstration(prompt, chosen)``: training on the chosen side, the
    usual way to build the starting model of preference training from the same data. ``stats``
    counts examples (``DataStats.counting``); hand it to ``tokenize_demonstrations``.
    """
    counts = None if stats is None else stats.counting("examples")
    return _load(path, formats, format_name, options, strict, counts, options_by_format,
                 _as_demonstration)


def load_unpaired(path: str | Path, formats: Registry[DataFormat],
                  format_name: str | None = None, options: dict[str, Any] | None = None, *,
                  strict: bool = False, stats: DataStats | None = None,
                  options_by_format: Mapping[str, dict[str, Any]] | None = None
                  ) -> list[SourcedUnpaired]:
    """Every usable record of ``path`` as unpaired examples, for a loss over unpaired data
    (KTO). Read, detected, dropped and refused exactly as by ``load_pairs``.

    A ``LabeledCompletion`` is one example. A ``PreferencePair`` becomes two, in this order: its
    chosen completion labelled desirable, then its rejected one labelled undesirable (how
    preference data is usually unpaired). A ``Demonstration`` has no label and is refused.
    ``stats`` counts examples (``DataStats.counting``); hand it to ``tokenize_unpaired``.
    """
    counts = None if stats is None else stats.counting("examples")
    nested = _load(path, formats, format_name, options, strict, counts, options_by_format,
                   _as_unpaired)
    return [example for group in nested for example in group]


def _as_unpaired(record: Record, fmt: DataFormat, path: str, line: int
                 ) -> list[SourcedUnpaired]:
    if isinstance(record, PreferencePair):
        return [SourcedUnpaired(LabeledCompletion(record.prompt, record.chosen, True), path, line),
                SourcedUnpaired(LabeledCompletion(record.prompt, record.rejected, False), path,
                                line)]
    if isinstance(record, Demonstration):
        raise DataError(f"{fmt.name} format: this record is a demonstration (a prompt and one "
                        "completion) without a label; an unpaired loss needs each completion "
                        'labelled: add "label": true (desirable) or false (undesirable)',
                        path, line)
    return [SourcedUnpaired(record, path, line)]


def _as_pair(record: Record, fmt: DataFormat, path: str, line: int) -> SourcedPair:
    if isinstance(record, LabeledCompletion):
        raise DataError(f"{fmt.name} format: this record is an unpaired example (one completion "
                        "labelled desirable or not), not a preference pair; train on unpaired "
                        "data with --loss kto", path, line)
    if isinstance(record, Demonstration):
        raise DataError(f"{fmt.name} format: this record is a demonstration (a prompt and one "
                        "completion), not a preference pair: it has no rejected completion, and "
                        "preference training needs pairs; train on it with `dpo sft`", path, line)
    return SourcedPair(record, path, line)


def _as_demonstration(record: Record, fmt: DataFormat, path: str,
                      line: int) -> SourcedDemonstration:
    if isinstance(record, PreferencePair):
        record = Demonstration(record.prompt, record.chosen)
    elif isinstance(record, LabeledCompletion):
        raise DataError(f"{fmt.name} format: this record is an unpaired example (one completion "
                        "labelled desirable or not), not a demonstration; train on it with "
                        "`dpo run --loss kto`", path, line)
    return SourcedDemonstration(record, path, line)


def _load(path: str | Path, formats: Registry[DataFormat], format_name: str | None,
          options: dict[str, Any] | None, strict: bool, stats: DataStats | None,
          options_by_format: Mapping[str, dict[str, Any]] | None,
          keep: Callable[[Record, DataFormat, str, int], T]) -> list[T]:
    """The reading loop of ``load_pairs`` and ``load_demonstrations``: each usable record
    parsed, checked to be a PreferencePair or a Demonstration, and handed to ``keep`` (with
    the format, the file and the line) for what the caller trains on."""
    shown = str(path)
    forced = formats.get(format_name) if format_name else None  # unknown names fail first
    # A format that reads files itself: the forced one if it does, else one claiming the suffix.
    reader = (forced if forced.reads_files() else None) if forced else _reader(formats, shown)
    fmt: DataFormat | None = None
    dropped = DataStats()
    kept: list[T] = []
    for line, record in read_records(path, reader):
        if fmt is None:
            cls = forced or reader or _detect(formats, record, shown, line)
            values = options if options is not None else (options_by_format or {}).get(cls.name)
            fmt = cls(cls.parse_options(dict(values or {})))
        try:
            parsed = fmt.parse(record)
        except UnusableRecord as exc:
            if strict:
                raise DataError(f"{fmt.name} format: {exc}; fix or remove the record, "
                                f"{STRICT_HINT}", shown, line) from None
            dropped.drop(exc.reason)
            continue
        except KeyError as exc:
            raise DataError(f"{fmt.name} format: missing field {exc}", shown, line) from None
        except (ValueError, TypeError) as exc:
            raise DataError(f"{fmt.name} format: {exc}", shown, line) from None
        except Exception as exc:  # noqa: BLE001 - a bug in a format plugin: still one line
            detail = first_line(exc, limit=200, fallback="")
            raise DataError(f"{fmt.name} format raised {type(exc).__name__} ({detail}); fix "
                            "the format plugin, or pick another with --format",
                            shown, line) from None
        if not isinstance(parsed, (PreferencePair, Demonstration, LabeledCompletion)):
            raise DataError(f"{fmt.name} format: parse() returned {type(parsed).__name__}, not a "
                            "PreferencePair, a Demonstration or a LabeledCompletion; a bug in the "
                            "data format plugin",
                            shown, line)
        kept.append(keep(parsed, fmt, shown, line))
    drops = dropped.drops()
    if stats is not None:
        for reason, count in drops.items():
            stats.drop(reason, count)
    if not kept:
        if drops:
            counts = ", ".join(f"{reason} {n}" for reason, n in drops.items())
            raise DataError(f"no usable records: all {sum(drops.values())} were dropped "
                            f"({counts}); run with --strict to stop at the first one and see why",
                            shown)
        raise DataError("no records: the file is empty or holds only blank lines", shown)
    return kept


def _reader(formats: Registry[DataFormat], path: str) -> type[DataFormat] | None:
    """The format that reads files named like ``path`` (by suffix), if one does."""
    lowered = path.lower()
    claimed = [cls for _, cls in formats if any(lowered.endswith(s) for s in cls.suffixes)]
    if len(claimed) > 1:
        names = ", ".join(cls.name for cls in claimed)
        raise UsageError(f"{path}: data formats {names} all read files named like this; "
                         "pick one with --format")
    return claimed[0] if claimed else None


def _detect(formats: Registry[DataFormat], record: dict[str, Any], path: str,
            line: int) -> type[DataFormat]:
    for _, cls in formats:  # sorted by name, so detection does not depend on install order
        try:
            if cls.detect(record):
                return cls
        except Exception as exc:  # noqa: BLE001 - detect must not raise; a plugin's may
            detail = first_line(exc, limit=200, fallback="")
            raise DataError(f"{cls.name} format's detect raised {type(exc).__name__} "
                            f"({detail}); fix or uninstall that plugin, or pick a format with "
                            "--format", path, line) from None
    keys = ", ".join(sorted(record)) or "none"
    installed = ", ".join(formats.names()) or "none"
    raise DataError(f"no installed data format recognises this record (keys: {keys}); "
                    f"installed: {installed}; pick one with --format", path, line)


# Offsets the split's generator from the sampler's (seed + epoch), so the held-out choice and
# the first epoch's shuffle are unrelated streams.
_SPLIT_SEED_OFFSET = 1_000_003


def split_eval(pairs: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): a deterministic random ``fraction`` of ``pairs`` held out.

    At least one pair is held out when ``fraction > 0`` and at least two pairs exist, and at
    least one is always left for training. Both parts keep the file order.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"eval fraction {fraction} must be in [0, 1)")
    n = len(pairs)
    if fraction == 0.0 or n < 2:
        return list(pairs), []
    k = min(n - 1, max(1, round(fraction * n)))
    generator = torch.Generator().manual_seed(seed + _SPLIT_SEED_OFFSET)
    held = set(torch.randperm(n, generator=generator)[:k].tolist())
    train = [p for i, p in enumerate(pairs) if i not in held]
    held_out = [p for i, p in enumerate(pairs) if i in held]
    return train, held_out
