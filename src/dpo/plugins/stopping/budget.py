"""The ``budget`` stopping policy: a run's limits in wall-clock time, tokens, pairs and epochs.

The time limit is a job's: when it is near, the run pauses with a checkpoint, and ``dpo run
--resume DIR`` in the next job goes on from there. The other limits are the run's own: reaching
one ends the run, like ``--max-steps``.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")


def parse_duration(value: Any) -> float:
    """Seconds in ``value``: a number (seconds) or a string such as ``"90s"``, ``"30m"``,
    ``"2h"``, ``"1.5d"`` or ``"45"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    found = _DURATION.match(str(value))
    if not found:
        raise ValueError("must be seconds or a duration such as 90s, 30m, 2h or 1d")
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


class Budget(StoppingPolicy):
    """Stops the run when any limit it is given is reached, after the step that reaches it,
    with a checkpoint of that step.

    * ``max_time``: wall-clock time of this invocation (a job's limit), counted from when the
      run's setup starts (before the model loads). The run pauses once the time used plus the
      longest gap between two steps so far (a step, and any evaluation and checkpoint after it)
      would pass the limit, i.e. before a step that would probably overrun it. A pause writes
      ``checkpoint-N`` and no ``final/``; the run's status reads "paused by budget: ...", the
      command exits 0, and ``dpo run --resume DIR`` continues the run with a fresh clock.
      Leave the job some minutes beyond ``max_time`` for the last checkpoint's write.
    * ``max_tokens``, ``max_pairs`` (examples, for sft), ``max_epochs``: counted over the whole
      run, resumes included (the counts are checkpointed). Reaching one ends the run as
      complete, with its final model. Tokens are those of the step's rows without padding
      (prompts and completions, both sides of a pair); they and the pairs are read back from
      the step's ``tokens_per_second`` and ``samples_per_second`` times its ``step_time``.

    Under several processes (``--nproc``) each process keeps its own clock and counts, and the
    loop makes a stop or pause that any process decides every process's: the run pauses when
    the process that has used the most time is near ``max_time``, and stops at the first step
    where any process's count reaches its limit, on every process at once. The step's pairs and
    tokens are those of every process (the metrics count them so), so the counts are the run's.
    """

    name = "budget"

    class Options(PluginOptions):
        max_time: float | None = Field(None, gt=0, description=(
            "wall-clock limit of this invocation: seconds or 90s, 30m, 2h, 1d; pauses the run "
            "for --resume"))
        max_tokens: int | None = Field(None, ge=1, description="tokens over the whole run")
        max_pairs: int | None = Field(None, ge=1, description=(
            "pairs (examples) over the whole run"))
        max_epochs: float | None = Field(None, gt=0, description="epochs over the whole run")

        @field_validator("max_time", mode="before")
        @classmethod
        def _duration(cls, value: Any) -> Any:
            return None if value is None or value == "" else parse_duration(value)

        @model_validator(mode="after")
        def _some_limit(self) -> "Budget.Options":
            if all(v is None for v in (self.max_time, self.max_tokens, self.max_pairs,
                                       self.max_epochs)):
                raise PydanticCustomError("limits", "give at least one limit: max_time, "
                                          "max_tokens, max_pairs or max_epochs (e.g. -o "
                                          "budget.max_time=2h)")
            return self

    options: Options
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, options: PluginOptions | None = None, **values: Any):
        super().__init__(options, **values)
        self.started = self.clock()
        self.last_seen: float | None = None  # when the previous step's metrics came
        self.longest = 0.0  # the longest gap between two steps in this invocation
        self.tokens = 0
        self.pairs = 0

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        now = self.clock()
        elapsed = metrics.get("step_time", 0.0)
        self.tokens += round(metrics.get("tokens_per_second", 0.0) * elapsed)
        self.pairs += round(metrics.get("samples_per_second", 0.0) * elapsed)
        gap = elapsed if self.last_seen is None else now - self.last_seen
        self.longest, self.last_seen = max(self.longest, gap, elapsed), now
        o = self.options
        for used, limit, what in ((self.tokens, o.max_tokens, "tokens"),
                                  (self.pairs, o.max_pairs, "pairs"),
                                  (metrics.get("epoch"), o.max_epochs, "epochs")):
            if limit is not None and used is not None and used >= limit:
                return Decision(stop=True, reason=(
                    f"{used:g} {what} at step {step} reached max_{what}={limit:g}"))
        if o.max_time is not None:
            used = now - self.started
            if used + self.longest > o.max_time:
                return Decision(stop=True, resumable=True, reason=(
                    f"{used:.0f}s of max_time={o.max_time:g}s used at step {step}, and a step "
                    f"takes up to {self.longest:.1f}s"))
        return CONTINUE

    def state_dict(self) -> dict[str, Any]:
        # The clock is this invocation's: not saved.
        return {"tokens": self.tokens, "pairs": self.pairs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens = int(state.get("tokens", 0))
        self.pairs = int(state.get("pairs", 0))


@hookimpl
def dpo_register_stopping_policies(register):
    register(Budget)
