"""The ``chat`` data format: pairs of chat conversations, rendered with the model's chat template.

Two shapes of record, both with messages ``{"role": str, "content": str}``:

* ``{"prompt": [messages] or "text", "chosen": [messages], "rejected": [messages]}``: the prompt
  (a string is one user message) and the two completions (a string is one assistant message);
* ``{"chosen": [messages], "rejected": [messages]}``: two whole conversations that share a
  beginning; the prompt is the longest run of whole messages they share.

Either way the prompt must end with a turn the completions answer (not an assistant message) and
each completion must start with an assistant message.
"""

from __future__ import annotations

from typing import Any

from dpo.core.interfaces.data_format import DataFormat, Messages, PreferencePair, UnusableRecord, json_type
from dpo.core.interfaces.hookspecs import hookimpl

ASSISTANT = "assistant"


class ChatFormat(DataFormat):
    """Chat messages: ``prompt`` (optional), ``chosen`` and ``rejected`` as lists of
    ``{"role", "content"}`` messages; without a prompt, chosen and rejected are whole
    conversations sharing their beginning. Rendered with the tokenizer's chat template."""

    name = "chat"

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        values = [record.get(key) for key in ("prompt", "chosen", "rejected")]
        prompt, chosen, rejected = values
        # A list somewhere is what sets chat apart from the all-text formats (hh, preference).
        return (isinstance(chosen, (str, list)) and isinstance(rejected, (str, list))
                and ("prompt" not in record or isinstance(prompt, (str, list)))
                and any(isinstance(value, list) for value in values))

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        if "prompt" not in record:
            for key in ("chosen", "rejected"):
                if key not in record:
                    raise ValueError(f"missing field {key!r} (a chat record needs chosen and "
                                     "rejected, and prompt unless they are whole conversations)")
                if not isinstance(record[key], list):
                    raise ValueError(f"field {key!r} must be a list of messages (a whole "
                                     "conversation) when there is no 'prompt', got "
                                     f"{json_type(record[key])}")
            return split_conversations(message_list(record, "chosen"),
                                       message_list(record, "rejected"))
        needs = "a chat record with a prompt needs prompt, chosen and rejected"
        prompt = side(record, "prompt", "user", needs)
        chosen = side(record, "chosen", ASSISTANT, needs)
        rejected = side(record, "rejected", ASSISTANT, needs)
        check_not_empty(prompt, {"chosen": chosen, "rejected": rejected})
        if chosen == rejected:
            raise UnusableRecord("identical", "chosen and rejected are the same messages")
        check_turns(prompt, {"chosen": chosen, "rejected": rejected})
        return PreferencePair(prompt, chosen, rejected)


def split_conversations(chosen: Messages, rejected: Messages) -> PreferencePair:
    """The pair of two whole conversations: the prompt is their longest shared run of whole
    messages from the start; the completions are what follows it on each side.

    ``[u, a1]`` and ``[u, a2]`` give prompt ``[u]``, chosen ``[a1]``, rejected ``[a2]``.
    Raises ``UnusableRecord`` when they are identical, share nothing, or their shared part does
    not end right before an assistant reply on both sides.
    """
    shared = 0
    while (shared < min(len(chosen), len(rejected))
           and chosen[shared] == rejected[shared]):
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise UnusableRecord("identical", "chosen and rejected are the same conversation")
    if shared == 0:
        raise UnusableRecord("no_shared_prompt", "chosen and rejected differ from their first "
                             "message, so they share no prompt")
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(conversation):
            raise UnusableRecord("empty", f"{key!r} ends where the shared prompt ends "
                                 f"(message {shared}): it has no reply of its own")
    prompt = chosen[:shared]
    check_turns(prompt, {"chosen": chosen[shared:], "rejected": rejected[shared:]},
                f" (the conversations share {shared} message{'s' * (shared > 1)})",
                "no_shared_prompt")
    return PreferencePair(prompt, chosen[shared:], rejected[shared:])


# The helpers below are shared with the formats of demonstrations (``prompt-completion``,
# ``messages``), which check the same things of one completion.

def check_not_empty(prompt: Messages, completions: dict[str, Messages]) -> None:
    """``UnusableRecord`` for a prompt (``empty_prompt``) or a completion (``empty``) in which
    no message has any content."""
    if not any(m["content"] for m in prompt):
        raise UnusableRecord("empty_prompt", "the prompt is empty")
    for key, completion in completions.items():
        if not any(m["content"] for m in completion):
            raise UnusableRecord("empty", f"{key!r} is empty")


def check_turns(prompt: Messages, completions: dict[str, Messages], where: str = "",
                reason: str = "bad_roles") -> None:
    """The prompt ends with a turn to answer; each completion (name -> messages) starts with
    the answer."""
    if prompt[-1]["role"] == ASSISTANT:
        answer = "the completions answer" if len(completions) > 1 else "the completion answers"
        raise UnusableRecord(reason, f"the prompt ends with an assistant message{where}; it must "
                             f"end with the turn {answer}")
    for key, completion in completions.items():
        if completion[0]["role"] != ASSISTANT:
            raise UnusableRecord(reason, f"{key!r} starts with a {completion[0]['role']!r} "
                                 f"message{where}; a completion must start with an assistant reply")


def side(record: dict[str, Any], key: str, role: str, needs: str) -> Messages:
    """A prompt or completion field: a list of messages, or text as one message of ``role``
    (none for empty text). ``needs`` says which fields the record must have, for the message
    about a missing one."""
    if key not in record:
        raise ValueError(f"missing field {key!r} ({needs})")
    value = record[key]
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value else []
    return message_list(record, key)


def message_list(record: dict[str, Any], key: str) -> Messages:
    """The field ``key`` as a list of ``{"role": str, "content": str}`` messages (copies);
    ``ValueError`` naming the field and the message for anything else."""
    value = record[key]
    if not isinstance(value, list):
        raise ValueError(f"field {key!r} must be text or a list of messages, "
                         f"got {json_type(value)}")
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"field {key!r}, message {index}: expected an object "
                             f'{{"role": ..., "content": ...}}, got {json_type(message)}')
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                got = json_type(message[part]) if part in message else "nothing"
                raise ValueError(f"field {key!r}, message {index}: {part!r} must be a string, "
                                 f"got {got}")
    return [dict(message) for message in value]


@hookimpl
def dpo_register_data_formats(register):
    register(ChatFormat)
