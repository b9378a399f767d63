"""An example dpo plugin: the hinge preference loss (RSO), a tab-separated data format, a
logger that prints each step's loss and a ``dpo hinge-table`` command.

Installed, it is found through the ``dpo`` entry-point group (see pyproject.toml); nothing else
is needed. ``dpo run --loss example-hinge -o beta=0.1`` then trains with the loss, and
``dpo run --data pairs.tsv`` reads tab-separated pairs, and ``dpo run --log-to example-print``
prints each step's loss.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Iterator

import torch
import typer
from pydantic import Field

import dpo


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair hinge loss max(0, 1 - beta * h).

    Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization",
    arXiv:2309.06657 (the hinge variant of the RSO objective).

    Args:
        h: [B] log-ratio differences (r_w - r_l).
    Returns:
        [B] losses.
    """
    return torch.relu(1.0 - beta * h)


class HingeLoss(dpo.Loss):
    """Hinge loss on the policy/reference log-ratio difference (RSO)."""

    name = "example-hinge"
    requires_reference = True

    class Options(dpo.PluginOptions):
        beta: float = Field(0.1, gt=0, description="inverse margin: the loss is 0 once beta*h >= 1")

    def __call__(self, logps: dpo.PairLogps) -> dpo.LossOutput:
        if not logps.has_reference:
            raise ValueError("example-hinge needs reference log-probs")
        beta = self.options.beta
        r_w = logps.policy_chosen - logps.ref_chosen
        r_l = logps.policy_rejected - logps.ref_rejected
        return dpo.LossOutput(
            losses=hinge_loss(r_w - r_l, beta),
            chosen_rewards=(beta * r_w).detach(),
            rejected_rewards=(beta * r_l).detach(),
        )


# The usual escapes of tab-separated files, so that a field never holds a raw tab or newline.
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def _unescape(field: str, line: int) -> str:
    def one(match: re.Match) -> str:
        if match.group(1) not in _ESCAPES:
            raise dpo.DataError(f"unknown escape \\{match.group(1)} (use \\t, \\n, \\r or \\\\)",
                                line=line)
        return _ESCAPES[match.group(1)]

    if re.search(r"(?<!\\)(\\\\)*\\$", field):
        raise dpo.DataError("a field ends with a lone backslash (write \\\\ for one)", line=line)
    return re.sub(r"\\(.)", one, field)


class TSVFormat(dpo.DataFormat):
    """Tab-separated pairs in files ending ``.tsv``: a header line naming the columns
    ``prompt``, ``chosen`` and ``rejected`` (any order; other columns are ignored), then one pair
    per line. Inside a field ``\\t``, ``\\n``, ``\\r`` and ``\\\\`` stand for a tab, a newline, a
    carriage return and a backslash. Blank lines are skipped."""

    name = "example-tsv"
    suffixes = (".tsv",)
    COLUMNS = ("prompt", "chosen", "rejected")

    @classmethod
    def detect(cls, record: dict[str, Any]) -> bool:
        return False  # its records come from its own files, never from JSONL

    @classmethod
    def read(cls, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        header: list[str] | None = None
        with open(path, "rb") as handle:
            for line, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8-sig" if line == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise dpo.DataError("not UTF-8 text; save the file as UTF-8",
                                        line=line) from None
                if not text.strip():
                    continue
                fields = text.split("\t")
                if header is None:
                    missing = [c for c in cls.COLUMNS if c not in fields]
                    if missing:
                        columns = ", ".join(cls.COLUMNS)
                        raise dpo.DataError(f"the first line must name the columns {columns}; "
                                            f"missing {', '.join(missing)}", line=line)
                    header = fields
                    continue
                if len(fields) != len(header):
                    raise dpo.DataError(f"{len(fields)} fields, but the header names {len(header)} "
                                        "(a tab inside a field is written \\t)", line=line)
                yield line, {k: _unescape(v, line) for k, v in zip(header, fields)}

    def parse(self, record: dict[str, Any]) -> dpo.PreferencePair:
        prompt, chosen, rejected = (record[c] for c in self.COLUMNS)
        if not chosen.strip() or not rejected.strip():
            raise dpo.UnusableRecord("empty", "a completion is empty")
        return dpo.PreferencePair(prompt, chosen, rejected)


@dpo.hookimpl
def dpo_register_data_formats(register):
    register(TSVFormat)


@dpo.hookimpl
def dpo_register_losses(register):
    register(HingeLoss)


class PrintLogger(dpo.Logger):
    """Prints ``step N: loss X`` for every training step (a record with a ``loss``)."""

    name = "example-print"

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            typer.echo(f"step {step}: loss {metrics['loss']:.4f}")


@dpo.hookimpl
def dpo_register_loggers(register):
    register(PrintLogger)


@dpo.hookimpl
def dpo_register_commands(app):
    @app.command("hinge-table", rich_help_panel="Plugins")
    def hinge_table(
        beta: Annotated[float, typer.Option(help="beta of the hinge loss")] = 0.1,
    ) -> None:
        """Print the example hinge loss at a few log-ratio differences."""
        h = torch.tensor([-10.0, 0.0, 5.0, 10.0, 20.0])
        for hi, loss in zip(h.tolist(), hinge_loss(h, beta).tolist()):
            typer.echo(f"h={hi:g} loss={loss:g}")
