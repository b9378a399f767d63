"""The ``prompt-completion`` data format: demonstrations for supervised fine-tuning.

``{"prompt": ..., "completion": ...}``, each text or a list of chat messages
``{"role": str, "content": str}``. Text with text is trained as it is; as soon as either field
is a list the demonstration is rendered with the model's chat template (text then counts as one
message: user for the prompt, assistant for the completion), so the prompt must end with the
turn the completion answers and the completion must start with an assistant message.
"""

from __future__ import annotations

from typing import Any

from dpo.core.interfaces.data_format import DataFormat, Demonstration
from dpo.core.interfaces.hookspecs import hookimpl
from dpo.plugins.formats.chat import ASSISTANT, check_not_empty, check_turns, side

NEEDS = "a prompt-completion record needs prompt and completion"


class PromptCompletionFormat(DataFormat):
    """``prompt`` and ``completion``, each text or a list of ``{"role", "content"}``
    messages: one demonstration (``dpo sft``). Other keys are ignored."""

    name = "prompt-completion"

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        # A completion and no preference: pairs have chosen and rejected instead, and unpaired
        # examples (the ``unpaired`` format) a label.
        return ("completion" in record and "chosen" not in record and "rejected" not in record
                and "label" not in record)

    def parse(self, record: dict[str, Any]) -> Demonstration:
        prompt = side(record, "prompt", "user", NEEDS)
        completion = side(record, "completion", ASSISTANT, NEEDS)
        check_not_empty(prompt, {"completion": completion})
        if not all(isinstance(record[key], str) for key in ("prompt", "completion")):
            check_turns(prompt, {"completion": completion})
            return Demonstration(_kept(record["prompt"], prompt),
                                 _kept(record["completion"], completion))
        return Demonstration(record["prompt"], record["completion"])


def _kept(value: Any, messages: list[dict[str, str]]) -> Any:
    """A field as the record gave it: text stays text (one message when rendered), a list is
    the checked copy of its messages."""
    return value if isinstance(value, str) else messages


@hookimpl
def dpo_register_data_formats(register):
    register(PromptCompletionFormat)
