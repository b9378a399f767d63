"""``--log-to wandb``: Weights & Biases.

wandb's own settings apply: ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_NAME``,
``WANDB_MODE=offline`` (the run is kept on disk, ``wandb sync`` uploads it later),
``WANDB_DIR`` (where wandb keeps its files; default the run directory), an API key from
``wandb login``. Options ``-o wandb.project=...`` (and ``entity``, ``run_name``, ``group``,
``tags``) win over them. The run's configuration goes to W&B's config; every metric to its
history at its step; tables as ``wandb.Table``; a text as a one-column table.

The W&B run's id is kept in ``OUTPUT/wandb-run.json``: a resumed run continues that W&B run,
and skips the steps the earlier attempts logged (W&B only appends; the resumed run recomputes
them with the same values).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Sequence

from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.logger import Logger, RunInfo, numbers
from dpo.core.interfaces.options import PluginOptions
from dpo.plugins.loggers._state import read_state, write_state

STATE_FILE = "wandb-run.json"
DEFAULT_PROJECT = "dpo"


class WandbLogger(Logger):
    """Metrics, tables and texts to a Weights & Biases run."""

    name = "wandb"
    requires = ("wandb",)
    extra = "wandb"

    class Options(PluginOptions):
        project: str | None = Field(None, description="W&B project; default $WANDB_PROJECT, "
                                    f"else {DEFAULT_PROJECT!r}")
        entity: str | None = Field(None, description="W&B entity (user or team); default "
                                   "$WANDB_ENTITY, else your default entity")
        run_name: str | None = Field(None, description="the run's name; default $WANDB_NAME, "
                                     "else the run directory's name")
        group: str | None = Field(None, description="W&B group; default $WANDB_RUN_GROUP")
        tags: list[str] = Field(default_factory=list, description="W&B tags")

    def start(self, run: RunInfo) -> None:
        import wandb

        state_path = run.output / STATE_FILE
        state = read_state(state_path) if run.resumed else {}
        run_id = state.get("id") if isinstance(state.get("id"), str) else None
        # Continuing our own earlier W&B run: what the earlier attempts logged is there.
        self.skip_through = run.logged_through if run_id else -1
        run_id = run_id or uuid.uuid4().hex[:12]
        options = self.options
        directory = os.environ.get("WANDB_DIR") or str(run.output)
        self.run = wandb.init(
            project=options.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=options.entity, group=options.group, tags=options.tags or None,
            name=options.run_name or os.environ.get("WANDB_NAME") or run.output.resolve().name,
            id=run_id, resume="allow", dir=directory, config=run.config,
            # Off: wandb would wrap this process's stdout and stderr, which the run's own
            # console lines and progress use.
            settings=wandb.Settings(console="off", silent=True),
        )
        write_state(state_path, {"id": run_id, "project": self.run.project})

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if step <= self.skip_through:
            return
        self.run.log(numbers(metrics), step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        import wandb

        if step <= self.skip_through:
            return
        data = [[v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for v in r]
                for r in rows]
        self.run.log({name: wandb.Table(columns=list(columns), data=data)}, step=step)

    def log_text(self, name: str, text: str, step: int) -> None:
        self.log_table(name, ["text"], [[text]], step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("completed", "stopped") else 1)


@hookimpl
def dpo_register_loggers(register):
    register(WandbLogger)
