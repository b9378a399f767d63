"""What reading and tokenisation did to the data: records kept, truncated and dropped per reason."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

STRICT_HINT = "or run without --strict"

#: What ``DataStats.read`` and ``kept`` count: preference pairs (``dpo run``), or the examples of
#: supervised fine-tuning (``dpo sft``: demonstrations, and pairs trained on their chosen side).
UNITS = ("pairs", "examples")


@dataclass
class DataStats:
    """What reading and tokenisation did to the data; logged and written to run.json.

    ``read`` and ``kept`` count ``unit``s, and ``as_dict`` names them after it: ``pairs_read``
    and ``pairs_kept`` for preference pairs (the keys of a ``dpo run``'s run.json),
    ``examples_read`` and ``examples_kept`` for supervised fine-tuning. The other keys are the
    same for both (a drop reason that cannot occur for one stays 0).

    Every drop is counted under a reason: the fixed ``dropped_*`` fields below, and any other
    reason a data format or tokenisation gives (``UnusableRecord.reason``) in ``other_drops``;
    ``as_dict`` shows them all as ``dropped_<reason>``.
    """

    read: int = 0  # records given to tokenisation (records a format dropped not included)
    kept: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0  # pairs: chosen and rejected counted separately
    dropped_empty: int = 0  # a completion has no text
    dropped_empty_prompt: int = 0  # nothing precedes the completion to predict its first token
    dropped_identical: int = 0  # chosen == rejected: no preference to learn
    dropped_identical_after_truncation: int = 0  # both cut to the same tokens
    other_drops: dict[str, int] = field(default_factory=dict)  # reason -> records
    unit: str = "pairs"  # what read and kept count, one of UNITS

    def counting(self, unit: str) -> DataStats:
        """These stats, counting ``unit``s from now on (one of ``UNITS``). Drops are records of
        any kind; records read or kept already in another unit make it a ValueError (one
        DataStats per dataset and objective)."""
        if unit not in UNITS:
            raise ValueError(f"DataStats unit must be one of {', '.join(UNITS)}, got {unit!r}")
        if unit != self.unit and (self.read or self.kept):
            raise ValueError(f"these data counts already count {self.unit}; counting {unit} "
                             "needs a DataStats of its own")
        self.unit = unit
        return self

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` records dropped for ``reason`` (``"empty"`` -> ``dropped_empty``...)."""
        name = f"dropped_{reason}"
        if name in _FIXED_DROPS:
            setattr(self, name, getattr(self, name) + count)
        else:
            self.other_drops[reason] = self.other_drops.get(reason, 0) + count

    def drops(self) -> dict[str, int]:
        """reason -> records dropped, for the reasons that dropped any."""
        fixed = {name.removeprefix("dropped_"): getattr(self, name) for name in _FIXED_DROPS}
        return {reason: n for reason, n in {**fixed, **self.other_drops}.items() if n}

    def as_dict(self) -> dict[str, int]:
        out = {f"{self.unit}_read": self.read, f"{self.unit}_kept": self.kept}
        out.update((f.name, getattr(self, f.name)) for f in fields(self)
                   if f.name not in ("read", "kept", "other_drops", "unit"))
        out.update((f"dropped_{reason}", n) for reason, n in sorted(self.other_drops.items()))
        return out


_FIXED_DROPS = tuple(f.name for f in fields(DataStats) if f.name.startswith("dropped_"))
