"""``--log-to mlflow``: MLflow.

The tracking server is ``MLFLOW_TRACKING_URI`` (or ``-o mlflow.tracking_uri=``); without one, a
local file store in ``OUTPUT/mlruns`` (view it with ``mlflow ui --backend-store-uri
OUTPUT/mlruns``). The experiment is ``MLFLOW_EXPERIMENT_NAME`` (or ``-o mlflow.experiment=``),
else ``dpo``. The run's scalar settings become parameters, the whole configuration the artifact
``config.json``; every metric is logged at its step; tables are JSON artifacts
(``tables/NAME/step-N.json``: ``{"columns": [...], "data": [[...], ...]}``) and texts text
artifacts (``text/NAME/step-N.txt``).

MLflow takes metric names of letters, digits, ``_ - . / :`` and spaces only: any other character
becomes ``_`` (dpo's own names, ``eval/rewards/accuracies`` and the like, pass unchanged).

The MLflow run's id is kept in ``OUTPUT/mlflow-run.json``: a resumed run continues that MLflow
run, and skips the steps the earlier attempts logged (MLflow only appends; the resumed run
recomputes them with the same values).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any, Iterator, Sequence

from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.logger import Logger, RunInfo, numbers
from dpo.core.interfaces.options import PluginOptions
from dpo.plugins.loggers._state import read_state, write_state

STATE_FILE = "mlflow-run.json"
DEFAULT_EXPERIMENT = "dpo"
STORE_DIR = "mlruns"
STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED",
          "failed": "FAILED"}


def metric_name(name: str) -> str:
    """``name`` as MLflow takes it: characters other than letters, digits, ``_ - . /`` and
    spaces become ``_``; empty and ``.``/``..`` path parts go (MLflow refuses names that a file
    store would resolve to another path)."""
    name = re.sub(r"[^\w.\- /]", "_", name)
    parts = [p for p in name.split("/") if p and p not in (".", "..")]
    return "/".join(parts) or "_"


def param_values(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The configuration's values as MLflow parameters: nested tables flattened with ``.``,
    lists joined, each value at most 500 characters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(param_values(value, f"{prefix}{key}."))
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out[metric_name(f"{prefix}{key}")] = text[:500]
    return out


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a file store is
    what this logger asks for by default (no server, no database), so allow it while the
    client is made (where MLflow checks), unless the environment says otherwise."""
    key = "MLFLOW_ALLOW_FILE_STORE"
    if key in os.environ or not (uri.startswith("file:") or "://" not in uri):
        yield
        return
    os.environ[key] = "true"
    try:
        yield
    finally:
        os.environ.pop(key, None)


class MlflowLogger(Logger):
    """Metrics, tables and texts to an MLflow run."""

    name = "mlflow"
    requires = ("mlflow",)
    extra = "mlflow"

    class Options(PluginOptions):
        tracking_uri: str | None = Field(None, description="MLflow tracking URI; default "
                                         f"$MLFLOW_TRACKING_URI, else OUTPUT/{STORE_DIR}")
        experiment: str | None = Field(None, description="experiment name; default "
                                       f"$MLFLOW_EXPERIMENT_NAME, else {DEFAULT_EXPERIMENT!r}")
        run_name: str | None = Field(None, description="the run's name; default the run "
                                     "directory's name")

    def start(self, run: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        uri = (self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or (run.output.resolve() / STORE_DIR).as_uri())
        with _file_store_allowed(uri):
            self.client = client = MlflowClient(tracking_uri=uri)
        state_path = run.output / STATE_FILE
        state = read_state(state_path) if run.resumed else {}
        run_id = state.get("run_id") if state.get("tracking_uri") == uri else None
        self.skip_through = -1
        if isinstance(run_id, str) and self._exists(run_id):
            client.update_run(run_id, status="RUNNING")
            self.skip_through = run.logged_through
        else:
            name = (self.options.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                    or DEFAULT_EXPERIMENT)
            experiment = client.get_experiment_by_name(name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(name))
            created = client.create_run(experiment_id, run_name=self.options.run_name
                                        or run.output.resolve().name)
            run_id = created.info.run_id
            self._log_config(run_id, run.config)
        self.run_id = run_id
        write_state(state_path, {"run_id": run_id, "tracking_uri": uri})

    def _exists(self, run_id: str) -> bool:
        """Whether the store still has run ``run_id`` (it may have been deleted since)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _log_config(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(k, v) for k, v in sorted(param_values(config).items())]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_dict(run_id, config, "config.json")

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), v, now, step) for k, v in numbers(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        if step <= self.skip_through:
            return
        # Values JSON has no type for (a path, a tensor) go as their text.
        table = json.loads(json.dumps({"columns": list(columns), "data": [list(r) for r in rows]},
                                      default=str))
        self.client.log_dict(self.run_id, table, f"tables/{metric_name(name)}/step-{step}.json")

    def log_text(self, name: str, text: str, step: int) -> None:
        if step <= self.skip_through:
            return
        self.client.log_text(self.run_id, text, f"text/{metric_name(name)}/step-{step}.txt")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, STATUS.get(status, "FINISHED"))


@hookimpl
def dpo_register_loggers(register):
    register(MlflowLogger)
