"""``--log-to tensorboard``: TensorBoard event files in ``OUTPUT/tensorboard/``.

Every metric is a scalar under its own name (``loss``, ``eval/loss``, ``rewards/accuracies``:
TensorBoard groups names by the part before ``/``); tables and texts are text summaries
(a table as Markdown). A resumed run writes with ``purge_step`` set to the step after its
checkpoint, so that TensorBoard drops what the interrupted attempt logged after it and the
curves go on as one; a new run in the directory (``--overwrite``) purges from step 0. View with ``tensorboard --logdir OUTPUT/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.logger import Logger, RunInfo, numbers
from dpo.core.interfaces.options import PluginOptions


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``columns`` and ``rows`` as a Markdown table (``|`` in cells escaped, lines joined)."""
    def cell(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardLogger(Logger):
    """Scalars, texts and tables as TensorBoard event files."""

    name = "tensorboard"
    requires = ("tensorboard",)
    extra = "tensorboard"

    class Options(PluginOptions):
        directory: str = Field("tensorboard", description="where the event files go: a "
                               "directory in the run directory, or an absolute path")

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run.output / Path(self.options.directory)
        # TensorBoard's readers drop the events already in the directory from this step on:
        # a resumed run's after its checkpoint (the earlier attempt's), and a new run's
        # (--overwrite) all of them.
        purge = run.step + 1 if run.step else 0
        self.writer = SummaryWriter(str(self.path), purge_step=purge)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in numbers(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash loses nothing already reported

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        self.writer.add_text(name, markdown_table(columns, rows), step)
        self.writer.flush()

    def log_text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()


@hookimpl
def dpo_register_loggers(register):
    register(TensorBoardLogger)
