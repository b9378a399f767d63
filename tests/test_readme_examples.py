"""The README's `dpo run`, `dpo sft` and `dpo demo` examples run in the order a reader meets
them: none writes into a directory an earlier one wrote, unless it says --resume or
--overwrite."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from dpo.core.training.config import OBJECTIVE_DEFAULTS, RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


TRAINING = ("run", "sft", "demo")


def run_commands(text: str) -> list[list[str]]:
    """The command and arguments of each `dpo run`, `dpo sft` and `dpo demo` (`.venv/bin/dpo
    run`, `-m dpo run`, ...) in the code blocks of ``text``, in order; a line may chain commands
    with && or ;. `dpo demo` writes its --output (also `out` by default) like a run."""
    commands = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            if not re.search(r"\bdpo (run|sft|demo)\b", line):
                continue
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part, comments=True)
                for i in range(1, len(words)):
                    if words[i] in TRAINING and Path(words[i - 1]).name == "dpo":
                        commands.append(words[i:])
                        break
    return commands


def output_of(command: list[str]) -> tuple[str, bool]:
    """(the run directory this command writes, whether it may reuse one)."""
    name, args = command[0], command[1:]
    output = str(OBJECTIVE_DEFAULTS["sft"]["output"] if name == "sft"
                 else RunConfig.model_fields["output"].default)
    reuse = "--overwrite" in args
    for i, word in enumerate(args):
        if word in ("--output", "--resume") and i + 1 < len(args):
            output = args[i + 1]
            reuse = reuse or word == "--resume"
        elif word.startswith(("--output=", "--resume=")):
            output = word.split("=", 1)[1]
            reuse = reuse or word.startswith("--resume=")
    return os.path.normpath(output), reuse


def clashes(text: str) -> list[str]:
    seen: set[str] = set()
    found = []
    for args in run_commands(text):
        output, reuse = output_of(args)
        if output in seen and not reuse:
            found.append(f"dpo {' '.join(args)}: {output} holds an earlier example's run")
        seen.add(output)
    return found


def test_the_checker_finds_a_reused_directory():
    """The README's old order: the demo (into `out`), then an example writing `out/` again."""
    text = ("```bash\nbash scripts/setup.sh && .venv/bin/dpo run\n```\n"
            "```text\ndpo run --model tiny --output out/   # comment\n"
            "dpo run --resume out/\ndpo run --overwrite\n"
            "torchrun --nproc-per-node 2 -m dpo run --model tiny\n```\n")
    assert [output_of(a) for a in run_commands(text)] == [
        ("out", False), ("out", False), ("out", True), ("out", True), ("out", False)]
    assert len(clashes(text)) == 2


def test_the_checker_counts_sft_with_its_own_default_output():
    text = ("```text\ndpo sft --data pairs.jsonl\ndpo run --model out-sft/final\n"
            "dpo sft --resume out-sft --max-steps 9\ndpo sft --max-steps 5\n```\n")
    assert [output_of(a) for a in run_commands(text)] == [
        ("out-sft", False), ("out", False), ("out-sft", True), ("out-sft", False)]
    assert len(clashes(text)) == 1


def test_the_checker_counts_the_demo_study():
    text = ("```bash\nbash scripts/setup.sh && .venv/bin/dpo demo\n```\n"
            "```text\ndpo run --max-steps 5\ndpo demo --overwrite\n```\n")
    assert [output_of(a) for a in run_commands(text)] == [
        ("out", False), ("out", False), ("out", True)]
    assert len(clashes(text)) == 1


def test_readme_run_examples_write_distinct_directories():
    commands = run_commands(README.read_text())
    assert len(commands) >= 10  # the checker still finds the README's examples
    assert clashes(README.read_text()) == []
