"""The ``messages`` data format: whole conversations for supervised fine-tuning.

``{"messages": [{"role": str, "content": str}, ...]}``, the common conversational shape of SFT
data. The prompt is the messages before the first assistant message; the completion is the rest,
from the first assistant message on. A completion of several turns trains every assistant
message in it, the other roles' turns being context (``dpo.core.data.tokenization``). Rendered
with the model's chat template.
"""

from __future__ import annotations

from typing import Any

from dpo.core.interfaces.data_format import DataFormat, Demonstration, UnusableRecord, json_type
from dpo.core.interfaces.hookspecs import hookimpl
from dpo.plugins.formats.chat import ASSISTANT, message_list

FIELD = "messages"


class MessagesFormat(DataFormat):
    """A conversation in ``messages`` (a list of ``{"role", "content"}`` messages): one
    demonstration (``dpo sft``), its assistant messages trained. Other keys are ignored."""

    name = "messages"

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        # Records with a completion or a preference belong to the formats built on those keys.
        return (isinstance(record.get(FIELD), list)
                and not any(key in record for key in ("completion", "chosen", "rejected")))

    def parse(self, record: dict[str, Any]) -> Demonstration:
        if FIELD not in record:
            raise ValueError(f"missing field {FIELD!r} (a messages record needs a list of "
                             "messages)")
        if not isinstance(record[FIELD], list):
            raise ValueError(f"field {FIELD!r} must be a list of messages, got "
                             f"{json_type(record[FIELD])}")
        conversation = message_list(record, FIELD)
        first = next((i for i, m in enumerate(conversation) if m["role"] == ASSISTANT), None)
        if first is None:
            raise UnusableRecord("no_assistant", "the conversation has no assistant message, so "
                                 "there is no reply to learn")
        if first == 0:
            raise UnusableRecord("empty_prompt", "the conversation starts with an assistant "
                                 "message: nothing precedes the reply to learn")
        prompt, completion = conversation[:first], conversation[first:]
        if not any(m["content"] for m in prompt):
            raise UnusableRecord("empty_prompt", "every message before the first assistant "
                                 "message is empty")
        if not any(m["content"] for m in completion if m["role"] == ASSISTANT):
            raise UnusableRecord("empty", "every assistant message is empty")
        return Demonstration(prompt, completion)


@hookimpl
def dpo_register_data_formats(register):
    register(MessagesFormat)
