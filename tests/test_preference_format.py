"""The built-in ``preference`` data format."""

from __future__ import annotations

import pytest

from dpo.core.interfaces.data_format import PreferencePair
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.plugins.formats.preference import PreferenceFormat

MODULE = "dpo.plugins.formats.preference"


def test_is_a_default_plugin_and_registers_under_its_name():
    assert MODULE in DEFAULT_PLUGINS
    catalog = collect(get_plugin_manager(load_entrypoints=False, defaults=(MODULE,)))
    assert catalog.formats.get("preference") is PreferenceFormat
    assert catalog.registrations[MODULE] == {"dpo_register_data_formats": ["preference"]}


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, True),
    ({"prompt": "", "chosen": "c", "rejected": "r", "id": 7}, True),  # extra keys ignored
    ({"prompt": "p", "chosen": "c"}, False),
    ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, False),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, False),
    ({}, False),
])
def test_detect(record, expected):
    assert PreferenceFormat.detect(record) is expected


def test_parse_returns_the_three_fields():
    record = {"prompt": "Q?", "chosen": " yes", "rejected": " no", "score": 1}
    assert PreferenceFormat().parse(record) == PreferencePair("Q?", " yes", " no")


@pytest.mark.parametrize("value, kind", [
    (["a"], "list"), ({"a": 1}, "object"), (3, "number"), (None, "null"), (True, "boolean"),
])
def test_parse_names_the_field_and_the_wrong_type(value, kind):
    with pytest.raises(ValueError) as info:
        PreferenceFormat().parse({"prompt": "p", "chosen": value, "rejected": "r"})
    assert str(info.value) == f"field 'chosen' must be a string, got {kind}"


def test_parse_names_a_missing_field():
    with pytest.raises(ValueError, match="missing field 'rejected'"):
        PreferenceFormat().parse({"prompt": "p", "chosen": "c"})


def test_has_no_options():
    assert PreferenceFormat.describe_options() == []
    with pytest.raises(UsageError, match="unknown option 'beta'"):
        PreferenceFormat.parse_options({"beta": "1"})
