"""The ``unpaired`` data format: single completions labelled desirable or undesirable, for
losses over unpaired data (``dpo run --loss kto``).

``{"prompt": ..., "completion": ..., "label": true|false}``, the prompt and completion each
text or a list of chat messages ``{"role": str, "content": str}``, as in ``prompt-completion``:
text with text is trained as it is; as soon as either field is a list the example is rendered
with the model's chat template (text then counts as one message: user for the prompt,
assistant for the completion). ``label`` must be a JSON boolean.
"""

from __future__ import annotations

from typing import Any

from dpo.core.interfaces.data_format import DataFormat, LabeledCompletion, json_type
from dpo.core.interfaces.hookspecs import hookimpl
from dpo.plugins.formats.chat import ASSISTANT, check_not_empty, check_turns, side

NEEDS = "an unpaired record needs prompt, completion and label"


class UnpairedFormat(DataFormat):
    """``prompt``, ``completion`` and a boolean ``label`` (true: desirable, false: undesirable):
    one unpaired example. Other keys are ignored."""

    name = "unpaired"

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        return "label" in record and "completion" in record and "chosen" not in record

    def parse(self, record: dict[str, Any]) -> LabeledCompletion:
        prompt = side(record, "prompt", "user", NEEDS)
        completion = side(record, "completion", ASSISTANT, NEEDS)
        if "label" not in record:
            raise ValueError(f"missing field 'label' ({NEEDS})")
        label = record["label"]
        if not isinstance(label, bool):
            raise ValueError(f"field 'label' must be a boolean (true: desirable, false: "
                             f"undesirable), got {json_type(label)} {label!r}")
        check_not_empty(prompt, {"completion": completion})
        if not all(isinstance(record[key], str) for key in ("prompt", "completion")):
            check_turns(prompt, {"completion": completion})
            return LabeledCompletion(_kept(record["prompt"], prompt),
                                     _kept(record["completion"], completion), label)
        return LabeledCompletion(record["prompt"], record["completion"], label)


def _kept(value: Any, messages: list[dict[str, str]]) -> Any:
    """A field as the record gave it: text stays text, a list is the checked copy."""
    return value if isinstance(value, str) else messages


@hookimpl
def dpo_register_data_formats(register):
    register(UnpairedFormat)
