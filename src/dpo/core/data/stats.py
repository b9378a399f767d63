"""What reading and tokenisation did to the data: records kept, truncated and dropped per reason."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

STRICT_HINT = "or run without --strict"


@dataclass
class DataStats:
    """What reading and tokenisation did to the data; logged and written to run.json.

    Every drop is counted under a reason: the fixed ``dropped_*`` fields below, and any other
    reason a data format gives (``UnusableRecord.reason``) in ``other_drops``; ``as_dict`` shows
    them all as ``dropped_<reason>``.
    """

    pairs_read: int = 0  # pairs given to tokenize_pairs (records a format dropped not included)
    pairs_kept: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0  # chosen and rejected counted separately
    dropped_empty: int = 0  # chosen or rejected has no text
    dropped_empty_prompt: int = 0  # nothing precedes the completion to predict its first token
    dropped_identical: int = 0  # chosen == rejected: no preference to learn
    dropped_identical_after_truncation: int = 0  # both cut to the same tokens
    other_drops: dict[str, int] = field(default_factory=dict)  # reason -> records

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
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other_drops"}
        out.update((f"dropped_{reason}", n) for reason, n in sorted(self.other_drops.items()))
        return out


_FIXED_DROPS = tuple(f.name for f in fields(DataStats) if f.name.startswith("dropped_"))
