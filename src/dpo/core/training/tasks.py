"""Downstream benchmarks with EleutherAI's lm-eval harness (the ``eval`` extra): ``dpo eval
--tasks`` and, during training, ``--eval-tasks``.

Tasks are named as the harness names them (``hellaswag``, ``arc_easy``, a group such as
``mmlu``), or given as a directory of the harness's task YAML files (every task defined there)
or as one such YAML file: local tasks, e.g. over a JSONL file (``dataset_path: json``). The
harness scores the model through ``dpo.core.model.harness.HarnessLM``, on the backend's device
in its dtype, and computes each metric with its standard error.

Scores are flattened as ``{task: {metric: {"value": v, "stderr": s}}}``; a metric's name drops
the harness's ``,none`` filter suffix, and a metric under another filter keeps the filter's
name as ``<metric>_<filter>``. During training they go into ``metrics.jsonl`` as
``{"step": N, "eval/tasks/<task>/<metric>": v, "eval/tasks/<task>/<metric>_stderr": s}``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.errors import UsageError, first_line
from dpo.core.training.checkpoint import write_json_atomic
from dpo.core.training.rundir import RUN_FILE

EXTRA = "dpo-trainer[eval]"
RESULTS_DIR = "eval-tasks"  # in a run directory: one JSON file of the harness's results per model
METRIC_PREFIX = "eval/tasks/"
# What a results file keeps of the harness's own output: each is keyed by task (or group).
HARNESS_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot",
                "higher_is_better", "n-samples")
SEED = 1234  # the harness's own default seed for its few-shot sampler, numpy and torch


def require_lm_eval(flag: str = "--tasks") -> Any:
    """The ``lm_eval`` module, or one line naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise UsageError(f"{flag} needs EleutherAI's lm-eval harness: pip install "
                         f"'{EXTRA}'") from None
    return lm_eval


def split_tasks(text: str | list[str] | None) -> list[str]:
    """``"hellaswag, arc_easy"`` (or several such values) -> ``["hellaswag", "arc_easy"]``."""
    items = [text] if isinstance(text, str) else list(text or [])
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


class TaskSuite:
    """The tasks ``entries`` name (harness task or group names, directories of task YAML
    files, YAML files), checked now: a name the harness does not know, or a path that is not
    there, is one line before anything runs. Loading a task's data waits for ``evaluate``."""

    def __init__(self, entries: list[str], flag: str = "--tasks"):
        require_lm_eval(flag)
        from lm_eval.tasks import TaskManager

        if not entries:
            raise UsageError(f"{flag}: no task given; name tasks (e.g. hellaswag,arc_easy) or a "
                             "directory of task YAML files")
        self.flag = flag
        directories, self.specs, names = [], [], []
        for entry in entries:
            path = Path(entry).expanduser()
            if path.is_dir():
                found = TaskManager(include_path=str(path), include_defaults=False).all_subtasks
                if not found:
                    raise UsageError(f"{flag} {entry}: no task YAML file there (a file with a "
                                     "`task:` key); see the harness's task guide")
                directories.append(str(path))
                self.specs += [name for name in found if name not in self.specs]
            elif path.suffix in (".yaml", ".yml"):
                if not path.is_file():
                    raise UsageError(f"{flag} {entry}: no such task file")
                self.specs.append(str(path))
            elif "/" in entry or os.sep in entry:
                raise UsageError(f"{flag} {entry}: no such directory")
            else:
                names.append(entry)
                self.specs.append(entry)
        # The harness's own tasks are indexed only when one is named (a few seconds).
        self.manager = TaskManager(include_path=directories or None,
                                   include_defaults=bool(names))
        known = set(self.manager.all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UsageError(f"{flag} {name}: not a task the lm-eval harness knows{hint} "
                                 "(`lm-eval ls tasks` lists them)")

    def load(self) -> dict[str, Any]:
        """The harness's task dictionary; a task whose data cannot be had is one line."""
        tasks: dict[str, Any] = {}
        groups: dict[str, Any] = {}
        group_map: dict[str, Any] = {}
        for spec in self.specs:
            try:
                with _quiet():
                    loaded = self.manager.load([spec])
            except Exception as exc:  # the harness and datasets raise many kinds
                offline = any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
                hint = ("; its data comes from the Hugging Face hub, which is switched off here "
                        "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else
                        "; a hub task needs the hub reachable once (then its data is cached), "
                        "a local task a readable data file")
                raise UsageError(f"{self.flag} {spec}: its data could not be loaded "
                                 f"({first_line(exc, limit=200)}){hint}") from None
            tasks.update(loaded["tasks"])
            groups.update(loaded["groups"])
            group_map.update(loaded.get("group_map") or {})
        return {"tasks": tasks, "groups": groups, "group_map": group_map}

    def evaluate(self, lm: Any, *, limit: int | None = None, num_fewshot: int | None = None,
                 bootstrap_iters: int = 1000) -> dict[str, Any]:
        """The harness's results for ``lm`` (``lm_eval.evaluator.evaluate``); ``limit``: the
        first examples of each task only. The harness's seeds are set inside and the callers'
        random states (Python, numpy, torch on the host) are as they were afterwards, so that
        an evaluation during training leaves the run's random streams alone."""
        from lm_eval.evaluator import evaluate

        with _random_states_kept(), _quiet():
            random.seed(0)
            _numpy().random.seed(SEED)
            torch.manual_seed(SEED)
            loaded = self.load()
            for task in loaded["tasks"].values():
                if num_fewshot is not None:
                    task.set_config(key="num_fewshot", value=num_fewshot)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=SEED)
            results = evaluate(lm=lm, task_dict=loaded, limit=limit,
                               bootstrap_iters=bootstrap_iters, log_samples=False)
        return {key: results[key] for key in HARNESS_KEYS if key in results}


def _numpy() -> Any:
    import numpy

    return numpy


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    state, np_state = random.getstate(), _numpy().random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state)
            _numpy().random.set_state(np_state)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from the harness and datasets (tqdm writes to the ``sys.stderr`` of
    the moment a bar is made, and reads TQDM_DISABLE only at import): a run already shows its
    progress, and a table follows. Loggers keep the stream they were given."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def flatten(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{task: {metric: {"value": v, "stderr": s}}}`` from the harness's ``results`` (a
    stderr the harness did not compute is None)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, entries in results.get("results", {}).items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in entries.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not _number(value):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            stderr = entries.get(f"{metric}_stderr,{filter_name}")
            metrics[name] = {"value": float(value),
                             "stderr": float(stderr) if _number(stderr) else None}
        if metrics:
            out[task] = metrics
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_record(scores: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, float]:
    """Flattened scores as ``metrics.jsonl`` keys (``eval/tasks/<task>/<metric>`` and its
    ``_stderr``; a stderr the harness did not compute is left out)."""
    record: dict[str, float] = {}
    for task, metrics in scores.items():
        for metric, entry in metrics.items():
            record[f"{METRIC_PREFIX}{task}/{metric}"] = entry["value"]  # type: ignore[assignment]
            if entry["stderr"] is not None:
                record[f"{METRIC_PREFIX}{task}/{metric}_stderr"] = entry["stderr"]
    return record


def results_file_of(model: str) -> Path | None:
    """Where ``dpo eval --tasks`` keeps the results of ``model`` when it belongs to a run: a
    run directory (its final model) -> ``RUN/eval-tasks/final.json``; a run's ``final/``,
    ``best/`` or ``checkpoint-N/`` -> ``RUN/eval-tasks/<that name>.json``; else None."""
    path = Path(model)
    if not path.is_dir():
        return None
    if (path / RUN_FILE).is_file():
        return path / RESULTS_DIR / "final.json"
    if path.name and (path.parent / RUN_FILE).is_file():
        return path.parent / RESULTS_DIR / f"{path.name}.json"
    return None


def results_document(results: dict[str, Any], about: dict[str, Any]) -> dict[str, Any]:
    """What a results file holds: ``about`` (model, backend, dtype, limit, step...), the date,
    the harness's version, the flattened ``metrics``, and the harness's own results, configs,
    versions, n-shot, higher_is_better and n-samples, each keyed by task."""
    from importlib.metadata import version

    return {**about, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "lm_eval_version": version("lm_eval"), "metrics": flatten(results),
            **{key: results[key] for key in HARNESS_KEYS if key in results}}


def write_results(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically. An earlier results file there (written by
    this command: it has ``metrics``) keeps the tasks this evaluation did not run."""
    previous: dict[str, Any] = {}
    if path.is_file():
        import json

        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        if not (isinstance(previous, dict) and isinstance(previous.get("metrics"), dict)):
            raise UsageError(f"{path}: exists and is not a results file of `dpo eval --tasks`; "
                             "move it away, or give --output another file")
    merged = dict(document)
    for key in ("metrics", *HARNESS_KEYS):
        if isinstance(previous.get(key), dict) and isinstance(document.get(key), dict):
            merged[key] = {**previous[key], **document[key]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, merged)


def harness_lm(model: torch.nn.Module, tokenizer: Any, backend: Backend, dtype: torch.dtype,
               device: torch.device, batch_size: int, max_length: int | None = None) -> Any:
    """``dpo.core.model.harness.HarnessLM`` (imported once the extra is known to be there)."""
    from dpo.core.model.harness import HarnessLM

    return HarnessLM(model, tokenizer, backend, dtype, device, batch_size, max_length)


class TaskRunner:
    """``--eval-tasks`` during training: the policy scored on ``suite`` at given steps; the
    scores are returned as a ``metrics.jsonl`` record and, where ``write`` (the main process),
    the harness's results are kept in ``OUTPUT/eval-tasks/step-N.json``."""

    def __init__(self, suite: TaskSuite, output: Path, *, steps: int = 0,
                 limit: int | None = None, batch_size: int = 8, write: bool = True):
        self.suite, self.output, self.steps = suite, output, steps
        self.limit, self.batch_size, self.write = limit, batch_size, write

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.steps and step % self.steps == 0)

    def __call__(self, model: torch.nn.Module, tokenizer: Any, backend: Backend,
                 dtype: torch.dtype, device: torch.device, step: int) -> dict[str, float]:
        lm = harness_lm(model, tokenizer, backend, dtype, device, self.batch_size)
        results = self.suite.evaluate(lm, limit=self.limit)
        document = results_document(results, {"step": step, "backend": backend.name,
                                               "dtype": str(dtype).removeprefix("torch."),
                                               "limit": self.limit,
                                               "max_length": lm.max_length})
        if self.write:
            path = self.output / RESULTS_DIR / f"step-{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, document)  # a step scored again (a resume) replaces it
        return metric_record(document["metrics"])
