"""The built-in demo dataset: which of two numbers is larger (or smaller)?

Each record asks a question such as "Which number is larger: 59 or 63?" and prefers the right
answer ("63") over the other number of the question ("59"). Why this task:

* the right answer is checkable (``right_answer``), so every pair is known to be correct;
* chosen and rejected have the same format and length (two-digit numbers, both copied from the
  prompt), so nothing but the question itself tells them apart: no length or style cue;
* no preference can be learned without reading the question: the right answer is the larger
  number in half the records and the first-mentioned number in half (exactly, in every run
  of four records);
* SmolLM2-135M-Instruct starts at chance (its log-probability of the right number beats the
  other number's in about half the held-out questions) and forty DPO steps of eight pairs teach
  it (about 97% afterwards), a few minutes on two CPU cores.

The data is generated, not downloaded, and is the same on every machine and every call: all
4005 unordered pairs of distinct numbers in [10, 99] are shuffled once by ``random.Random(SEED)``;
the first ``EVAL_POOL`` pairs belong to the held-out split and the rest to training, so no two
numbers are ever asked about together in both splits. ``n`` records of a split are the first
``n`` of that split's pairs, so a smaller set is a prefix of a larger one.

Records use the ``chat`` data format (lists of ``{"role", "content"}`` messages), rendered with
the model's chat template; a short system message asks for a bare number, which also keeps the
sequences short (SmolLM2's template adds a longer default system message otherwise).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 1729
LOW, HIGH = 10, 99  # two-digit numbers: every answer is two digit tokens long
EVAL_POOL = 1000  # unordered pairs reserved for the held-out split; the other 3005 train
TRAIN_SIZE = 320
EVAL_SIZE = 64
SPLITS = ("train", "eval")
SYSTEM_PROMPT = "Answer with the number only."
WORDS = ("larger", "smaller")
TRAIN_FILE = "demo-train.jsonl"
EVAL_FILE = "demo-eval.jsonl"

_QUESTION = re.compile(r"Which number is (larger|smaller): (\d+) or (\d+)\?")


@dataclass(frozen=True)
class Question:
    """One question: pick the ``word`` ("larger" or "smaller") of ``first`` and ``second``."""

    first: int
    second: int
    word: str

    @property
    def text(self) -> str:
        return f"Which number is {self.word}: {self.first} or {self.second}?"

    @property
    def answer(self) -> int:
        pick = max if self.word == "larger" else min
        return pick(self.first, self.second)

    @property
    def wrong(self) -> int:
        """The other number: a plausible mistake of exactly the answer's format."""
        return self.first + self.second - self.answer

    def record(self) -> dict[str, Any]:
        """The question as a ``chat`` format preference record."""
        return {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": self.text}],
            "chosen": [{"role": "assistant", "content": str(self.answer)}],
            "rejected": [{"role": "assistant", "content": str(self.wrong)}],
        }


def right_answer(question: str) -> int:
    """The right answer to a demo question's text, computed from the text alone (the task's
    checker: it knows nothing of how the data was generated)."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a demo question: {question!r}")
    word, first, second = match.group(1), int(match.group(2)), int(match.group(3))
    return max(first, second) if word == "larger" else min(first, second)


def is_right(question: str, answer: str) -> bool:
    """Whether ``answer`` (text, e.g. a generation) is exactly the right number for ``question``."""
    return answer.strip() == str(right_answer(question))


def in_form(question: str, answer: str) -> bool:
    """Whether ``answer`` has the form of an answer to ``question``: one of its two numbers and
    nothing else, right or wrong."""
    match = _QUESTION.fullmatch(question.strip())
    if match is None:
        raise ValueError(f"not a demo question: {question!r}")
    return answer.strip() in (match.group(2), match.group(3))


def _shuffled_pairs() -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a + 1, HIGH + 1)]
    random.Random(SEED).shuffle(pairs)  # a private generator: global random state is untouched
    return pairs


def _pool(split: str) -> list[tuple[int, int]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    pairs = _shuffled_pairs()
    return pairs[:EVAL_POOL] if split == "eval" else pairs[EVAL_POOL:]


def questions(split: str, n: int | None = None) -> list[Question]:
    """The first ``n`` questions of ``split`` ("train" or "eval"; ``n`` defaults to
    ``TRAIN_SIZE`` or ``EVAL_SIZE``).

    Question ``i`` asks for the larger number when ``i`` is even, the smaller when odd, and
    names the smaller number first when ``i // 2`` is even: every run of four questions covers
    the four combinations once, so neither "prefer the larger" nor "prefer the first-mentioned"
    beats chance.
    """
    pool = _pool(split)
    if n is None:
        n = TRAIN_SIZE if split == "train" else EVAL_SIZE
    if not 0 < n <= len(pool):
        raise ValueError(f"the {split} split holds 1 to {len(pool)} questions, {n} asked")
    out = []
    for i, (low, high) in enumerate(pool[:n]):
        first, second = (low, high) if (i // 2) % 2 == 0 else (high, low)
        out.append(Question(first, second, WORDS[i % 2]))
    return out


def demo_records(split: str, n: int | None = None) -> list[dict[str, Any]]:
    """Preference records (``chat`` format) of the first ``n`` questions of ``split``.

    >>> demo_records("eval", 1)[0]["chosen"]
    [{'role': 'assistant', 'content': '94'}]
    """
    return [q.record() for q in questions(split, n)]


def write_demo(directory: str | Path, train_size: int = TRAIN_SIZE,
               eval_size: int = EVAL_SIZE) -> tuple[Path, Path]:
    """Write ``demo-train.jsonl`` and ``demo-eval.jsonl`` into ``directory`` (created if
    needed); returns their paths. The bytes are the same on every machine."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, name, n in (("train", TRAIN_FILE, train_size), ("eval", EVAL_FILE, eval_size)):
        path = directory / name
        lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in demo_records(split, n))
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


# The hyperparameters `dpo run` uses on the demo dataset (``--data demo``, the default) for any
# option not set in a config file or on the command line. Chosen by measuring held-out reward
# accuracy after a few minutes of CPU training of SmolLM2-135M-Instruct (with DPO's default
# beta 0.1): lr 5e-5 reaches 0.97 held-out accuracy in 40 steps; lr 1e-4 reaches the same
# accuracy but pushes the right answer's own log-prob further down. Reward accuracy is not
# answering: from the base model, 0.078 of the greedy replies to the held-out questions are then
# the right number; from the SFT model, 0.44 against its own 0.78 (``dpo demo`` measures both
# the ranking and the replies; lr 1e-5 from the SFT model gives 0.95 and 0.47). From the SFT
# model ``dpo demo`` therefore takes DPO_AFTER_SFT_LR instead.
DEMO_PRESET: dict[str, Any] = {
    "lr": 5e-5,
    "max_steps": 40,
    "batch_size": 8,
    "eval_steps": 10,
    "save_steps": 0,
    # A few minutes' run: its 1.6 GB end-of-run checkpoint (weights and AdamW moments) is worth
    # nothing once final/ is written.
    "keep_checkpoints": False,
}

# ``dpo sft --data demo``: supervised training on the training split's right answers (the
# chosen side of each pair), so that the model learns the answer's form (a bare number). Checked
# on SmolLM2-135M-Instruct's greedy replies to the 64 held-out questions (``dpo demo``): none is
# a bare number before, all 64 are one of the question's two numbers after these 40 steps (50
# right); the held-out token-mean NLL falls from 5.14 to 0.29 by step 20 and 0.21 by step 40.
SFT_DEMO_PRESET: dict[str, Any] = dict(DEMO_PRESET)

# ``dpo demo``'s DPO stage, from the SFT model: a tenth of DEMO_PRESET's learning rate. Measured
# on the 64 held-out questions from the same SFT model (ranking accuracy / right replies /
# replies that are one of the two numbers; SFT itself 0.78 / 0.78 / 1.0): lr 5e-6 gives
# 0.86 / 0.86 / 1.0, the right answer's own log-prob rising (held-out logps/chosen -0.62 ->
# -0.41); lr 5e-5 gives 0.97 / 0.44 / 0.44 and beta 0.5 at lr 5e-5 1.0 / 0.33 / 0.33, both
# pushing that log-prob down (to -4.2 and -5.4), and IPO (beta 0.1, lr 5e-5) 0.98 / 0.36 / 0.36.
DPO_AFTER_SFT_LR = 5e-6


def demo_files() -> tuple[Path, Path]:
    """The demo's train and eval files, written once into the cache directory (their names
    carry a digest of their content, so a changed generator never reuses stale files)."""
    import hashlib
    import os

    from dpo.core.model.loading import cache_dir

    content = json.dumps([demo_records("train"), demo_records("eval")], sort_keys=True)
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    target = cache_dir() / "demo" / digest
    train, held = target / TRAIN_FILE, target / EVAL_FILE
    if not (train.is_file() and held.is_file()):
        tmp = target.with_name(f".{digest}.{os.getpid()}.tmp")
        write_demo(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote it first
            if not train.is_file():
                raise
    return train, held
