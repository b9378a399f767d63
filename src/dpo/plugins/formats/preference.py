"""The ``preference`` data format: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` as text."""

from __future__ import annotations

from typing import Any

from dpo.core.interfaces.data_format import DataFormat, PreferencePair, json_type
from dpo.core.interfaces.hookspecs import hookimpl

FIELDS = ("prompt", "chosen", "rejected")


class PreferenceFormat(DataFormat):
    """One JSON object per pair with string fields ``prompt``, ``chosen`` and ``rejected``
    (the completions without the prompt). Other keys are ignored."""

    name = "preference"

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        return all(isinstance(record.get(key), str) for key in FIELDS)

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        for key in FIELDS:
            if key not in record:
                raise ValueError(f"missing field {key!r} (a {self.name} record needs "
                                 f"{', '.join(FIELDS)})")
            value = record[key]
            if not isinstance(value, str):
                raise ValueError(f"field {key!r} must be a string, got {json_type(value)}")
        return PreferencePair(record["prompt"], record["chosen"], record["rejected"])


@hookimpl
def dpo_register_data_formats(register):
    register(PreferenceFormat)
