"""The ``hh`` data format: Anthropic HH-RLHF lines, two whole dialogues as text.

``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``: the two dialogues are the
same up to the last assistant reply. The prompt is the chosen text up to and including its last
``"\\n\\nAssistant:"``; the completions are what follows it on each side, leading space kept, as
the original data was tokenised.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from dpo.core.interfaces.data_format import DataFormat, Messages, PreferencePair, UnusableRecord, json_type
from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class HHFormat(DataFormat):
    """Anthropic HH-RLHF: string fields ``chosen`` and ``rejected`` holding whole dialogues
    (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that differ only in the last assistant reply;
    no ``prompt`` field. ``render=chat`` turns the dialogue into user/assistant messages for the
    tokenizer's chat template."""

    name = "hh"

    class Options(PluginOptions):
        render: Literal["verbatim", "chat"] = Field(
            "verbatim", description="verbatim: train on the text as it is; chat: split it into "
            "user/assistant messages rendered with the tokenizer's chat template")

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        chosen, rejected = record.get("chosen"), record.get("rejected")
        return ("prompt" not in record and isinstance(chosen, str) and isinstance(rejected, str)
                and ASSISTANT in chosen)

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        for key in ("chosen", "rejected"):
            if key not in record:
                raise ValueError(f"missing field {key!r} (an hh record needs chosen and rejected)")
            if not isinstance(record[key], str):
                raise ValueError(f"field {key!r} must be a string, got {json_type(record[key])}")
        chosen, rejected = record["chosen"], record["rejected"]
        end = chosen.rfind(ASSISTANT)
        if end < 0:
            raise UnusableRecord("no_assistant_turn", f"'chosen' has no {ASSISTANT!r} turn, so "
                                 "there is no reply to learn")
        prompt = chosen[: end + len(ASSISTANT)]
        if not rejected.startswith(prompt):
            raise UnusableRecord("no_shared_prompt", "'rejected' does not start with the dialogue "
                                 f"of 'chosen' up to its last {ASSISTANT!r} ({len(prompt)} "
                                 "characters), so the two share no prompt")
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            if not reply.strip():
                raise UnusableRecord("empty", f"the last reply of {key!r} is empty")
        if chosen == rejected:
            raise UnusableRecord("identical", "chosen and rejected are the same dialogue")
        if self.options.render == "verbatim":
            return PreferencePair(prompt, chosen, rejected)
        return _as_messages(prompt, chosen, rejected)


def _as_messages(prompt: str, chosen: str, rejected: str) -> PreferencePair:
    """The dialogue as user/assistant messages (content stripped); turns must alternate from a
    Human turn, as most chat templates require."""
    before, *turns = _TURN.split(prompt[: -len(ASSISTANT)])
    if before.strip():
        raise UnusableRecord("not_a_dialogue", f"text before the first {HUMAN!r} turn cannot be "
                             "rendered as chat messages")
    head = _turns(turns)
    completions = (_turns(_TURN.split(ASSISTANT + chosen)[1:]),
                   _turns(_TURN.split(ASSISTANT + rejected)[1:]))
    for key, completion in zip(("chosen", "rejected"), completions):
        for index, message in enumerate(head + completion):
            expected = "user" if index % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise UnusableRecord("not_alternating", f"turn {index + 1} of {key!r} is "
                                     f"{message['role']!r} where {expected!r} is due; as chat "
                                     "messages the turns must alternate Human, Assistant, ...")
    return PreferencePair(head, *completions)


def _turns(parts: list[str]) -> Messages:
    """``["Human", " hi", "Assistant", " hello"]`` -> user/assistant messages."""
    return [{"role": _ROLES[speaker], "content": text.strip()}
            for speaker, text in zip(parts[::2], parts[1::2])]


@hookimpl
def dpo_register_data_formats(register):
    register(HHFormat)
