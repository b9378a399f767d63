"""Several preference losses trained together: ``--loss dpo --loss sft -o weights=1.0,0.2``
trains on 1.0 * L_dpo + 0.2 * L_sft (e.g. DPO with an NLL term on the chosen completions).

A run's loss is one string everywhere (``RunConfig.loss``, ``run.json``, a sweep's grid, ``dpo
eval``): one name, or the parts' names joined by ``+`` (``dpo+sft``), so records and sweeps of
one loss read as before. ``resolve_loss`` turns that string and the run's options into the
``Loss`` the loop calls: the registered plugin itself for one name (exactly as before), or a
``Combination`` of the registered parts.

Options of a combination, keyed as ``RunConfig.options`` keys every plugin's:

* ``weights`` (under the combination's name, i.e. a plain ``-o weights=...``): one float per
  loss, in ``--loss`` order, each >= 0 and not all 0; default all 1.0;
* a plain key (``-o beta=0.2``) goes to every part that declares it; one that no part declares
  is an error naming the parts' options;
* a part's own key (``-o dpo.beta=0.1``, or an ``[options.dpo]`` table) goes to that part, and
  beats a plain key for it, whichever layer (file or flag) gave which.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch
from pydantic import ValidationError

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.config import FileOrigin
from dpo.core.training.plugin_calls import plugin_call

SEPARATOR = "+"  # joins the parts' names: "dpo+sft"
WEIGHTS = "weights"


def loss_names(loss: str) -> list[str]:
    """The parts of a run's loss string: ``"dpo+sft"`` -> ``["dpo", "sft"]``."""
    return loss.split(SEPARATOR)


class Combination(Loss):
    """sum_i w_i * L_i over registered losses L_i (the parts, in ``--loss`` order).

    * ``requires_reference``: whether any part needs one (a reference-free part ignores it).
    * per-pair losses: sum_i w_i * losses_i, so the gradient is the weighted sum too.
    * rewards (``rewards/*``): those of the first part that uses a reference, else of the first
      part: the implicit reward beta * log(pi/pi_ref) where there is one.
    * metrics: each part's own (a key two parts report goes under ``<part>/<key>`` for each),
      plus each part's unweighted loss as ``loss/<part>`` (``eval/loss/<part>`` in evaluations).
    * state (``on_step``, ``state_dict``): forwarded to the parts, keyed by part name.
    """

    kind = "loss"
    name = "combination"  # each instance names itself after its parts

    class Options(PluginOptions):
        weights: tuple[float, ...]

    options: Options

    def __init__(self, parts: dict[str, Loss], weights: list[float] | None = None):
        if len(parts) < 2:
            raise ValueError("a combination takes at least two losses")
        self.parts = dict(parts)
        self.name = SEPARATOR.join(self.parts)  # type: ignore[misc]
        weights = [1.0] * len(parts) if weights is None else list(weights)
        if len(weights) != len(parts):
            raise ValueError(f"{len(weights)} weights for {len(parts)} losses")
        self.options = self.Options(weights=tuple(weights))
        self.weights = dict(zip(self.parts, self.options.weights))
        self.requires_reference = any(p.requires_reference for p in self.parts.values())  # type: ignore[misc]
        self.primary = next((n for n, p in self.parts.items() if p.requires_reference),
                            next(iter(self.parts)))

    def label(self) -> str:
        """What the run's log says: ``dpo (x1.0) + sft (x0.2)``."""
        return " + ".join(f"{name} (x{weight})" for name, weight in self.weights.items())

    def __call__(self, logps: PairLogps) -> LossOutput:
        outputs = {name: plugin_call(part, "__call__", part, logps)
                   for name, part in self.parts.items()}
        losses = sum(self.weights[name] * out.losses for name, out in outputs.items())
        reported: dict[str, int] = {}
        for out in outputs.values():
            for key in out.metrics:
                reported[key] = reported.get(key, 0) + 1
        metrics: dict[str, torch.Tensor] = {}
        for name, out in outputs.items():
            for key, value in out.metrics.items():
                metrics[key if reported[key] == 1 else f"{name}/{key}"] = value
            metrics[f"loss/{name}"] = out.losses.detach()
        primary = outputs[self.primary]
        return LossOutput(losses=losses, chosen_rewards=primary.chosen_rewards,
                          rejected_rewards=primary.rejected_rewards, metrics=metrics)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for part in self.parts.values():
            plugin_call(part, "on_step()", part.on_step, step, metrics)

    def state_dict(self) -> dict[str, Any]:
        states = {name: plugin_call(part, "state_dict()", part.state_dict)
                  for name, part in self.parts.items()}
        return {name: state for name, state in states.items() if state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - set(self.parts))
        if unknown:
            raise ValueError(f"state for {unknown[0]!r}, which is no part of {self.name!r}")
        for name, part in self.parts.items():
            plugin_call(part, "load_state_dict()", part.load_state_dict, state.get(name, {}))


def parse_weights(value: Any, names: list[str], loss: str,
                  origin: FileOrigin | None = None) -> list[float]:
    """``weights`` as given (``"1.0,0.2"`` from ``-o``, a TOML list or string), checked: one
    per loss, finite, >= 0, not all 0. A one-line error otherwise, at ``origin`` (the config
    file's line) where the file gave them."""
    ones = ["1.0"] * len(names)
    example = f"weights = [{', '.join(ones)}]" if origin else f"-o weights={','.join(ones)}"
    order = "in that order" if origin else "in --loss order"

    def bad(message: str) -> UsageError:
        if origin is not None:
            return UsageError(origin.error(message))
        return UsageError(f"loss {loss!r}: option weights={_shown(value)}: {message}")

    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    try:
        weights = [float(item) for item in items]
    except (TypeError, ValueError):
        raise bad(f"not a list of numbers; give one per loss"
                  f"{'' if origin else ', comma-separated'} (e.g. {example})") from None
    if len(weights) != len(names):
        raise bad(f"{len(weights)} weight(s) for {len(names)} losses ({', '.join(names)}); "
                  f"give one per loss, {order} (e.g. {example})")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise bad("each weight must be a finite number >= 0")
    if not any(weights):
        raise bad("every weight is 0; at least one must be above 0")
    return weights


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse_part(cls: type[Loss], values: dict[str, Any], sources: dict[str, FileOrigin | None]
                ) -> Loss:
    """``cls`` built with its options ``values``; a bad one that a config file gave is reported
    at its line (``sources``: key -> where it came from, None for a flag)."""
    try:
        options = cls.parse_options(values)
    except UsageError as exc:
        key = _failing_key(cls, values)
        origin = sources.get(key) if key is not None else None
        if origin is None:
            raise
        # parse_options says "loss 'ipo': option beta=-1: why"; the file's line shows the rest.
        message = str(exc).removeprefix(f"{cls.kind} {cls.name!r}: ")
        message = message.removeprefix(f"option {key}={values[key]}: ")
        raise UsageError(origin.error(f"loss {cls.name!r}: {message}")) from None
    return plugin_call(cls, "__init__", cls, options)


def _failing_key(cls: type[Loss], values: dict[str, Any]) -> str | None:
    """The option of ``values`` that ``cls.parse_options`` refuses: one it does not declare,
    else the first that its validation names."""
    unknown = next((k for k in values if k not in cls.Options.model_fields), None)
    if unknown is not None:
        return unknown
    try:
        cls.Options.model_validate(values)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        return str(loc[0]) if loc else None
    return None


def resolve_loss(loss: str, options: Mapping[str, Mapping[str, Any]], catalog: Catalog,
                 asked: bool = True, origins: Mapping[Any, FileOrigin] | None = None) -> Loss:
    """The ``Loss`` a run with loss string ``loss`` and plugin ``options`` (keyed by plugin
    name, as ``RunConfig.options``) trains with: the registered class for one name, a
    ``Combination`` for ``a+b+...``. Options are validated here, before anything is written.
    ``asked``: the user named the loss (see ``dpo.core.interfaces.registry``). ``origins``:
    where a config file gave the loss and its options (``RunConfig.file_origins``), so that an
    error about them names the file and line."""
    origins = origins or {}
    at_loss = origins.get("loss")

    def loss_error(message: str) -> UsageError:
        return UsageError(at_loss.error(message) if at_loss else message)

    def sources(name: str, shared: Mapping[str, Any]) -> dict[str, FileOrigin | None]:
        """Where each option of part ``name`` came from: its own key, else the plain one."""
        found = {k: origins.get((loss, k)) for k in shared}
        found.update({k: origins.get((name, k)) for k in options.get(name, {})})
        return found

    names = loss_names(loss)
    if len(names) == 1:
        try:
            cls = catalog.losses.get(loss, asked=asked)
        except UsageError as exc:
            raise loss_error(str(exc)) from None
        if WEIGHTS in options.get(loss, {}) and WEIGHTS not in cls.Options.model_fields:
            message = (f"loss {loss!r}: option {WEIGHTS} weighs losses trained together; give "
                       f"--loss more than once (e.g. --loss {loss} --loss ipo), or drop it")
            origin = origins.get((loss, WEIGHTS))
            if origin is not None:
                several = (f'loss = ["{loss}", "ipo"]' if at_loss else
                           f"--loss {loss} --loss ipo")
                message = origin.error(f"weights weighs losses trained together, and loss is "
                                       f"{loss!r} alone; give several (e.g. {several}), or "
                                       "drop weights")
            raise UsageError(message)
        return _parse_part(cls, dict(options.get(loss, {})), sources(loss, {}))
    if "" in names:
        raise loss_error(f"--loss {loss!r}: an empty loss name; name each loss (e.g. --loss dpo "
                         "--loss ipo)" if at_loss is None else
                         "an empty loss name; name each loss (e.g. loss = [\"dpo\", \"ipo\"])")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise loss_error(f"loss {twice!r} is named twice ({loss}; --loss, or the config "
                         "file's loss list); name each loss once, and set its share with -o "
                         "weights=..." if at_loss is None else
                         f"loss {twice!r} is named twice; name each loss once, and set its "
                         "share with weights under [options]")
    try:
        classes = {name: catalog.losses.get(name, asked=asked) for name in names}
    except UsageError as exc:
        raise loss_error(str(exc)) from None
    unpaired = next((n for n, cls in classes.items() if cls.examples != "pairs"), None)
    if unpaired is not None:
        raise loss_error(f"loss {unpaired!r} trains on unpaired examples ("
                         f"{classes[unpaired].examples}), the other losses of {loss!r} on "
                         f"preference pairs: they cannot be trained together; run "
                         f"{'--loss ' + unpaired if at_loss is None else f'loss = {json.dumps(unpaired)}'}"
                         " alone")
    shared = dict(options.get(loss, {}))
    weights = (parse_weights(shared.pop(WEIGHTS), names, loss, origins.get((loss, WEIGHTS)))
               if WEIGHTS in shared else None)
    for key in shared:
        if not any(key in cls.Options.model_fields for cls in classes.values()):
            declared = "; ".join(f"{name}: {', '.join(sorted(cls.Options.model_fields)) or 'none'}"
                                 for name, cls in classes.items())
            origin = origins.get((loss, key))
            if origin is None:
                raise UsageError(f"loss {loss!r}: option {key!r} belongs to none of its parts "
                                 f"({declared}; and {WEIGHTS}); fix the name, or qualify it as "
                                 f"-o {names[0]}.KEY=...")
            raise UsageError(origin.error(
                f"option {key!r} belongs to none of the parts of loss {loss!r} ({declared}; "
                f"and {WEIGHTS}); fix the name, or move it to its loss's table "
                f"([options.{names[0]}])"))
    parts: dict[str, Loss] = {}
    for name, cls in classes.items():
        values = {k: v for k, v in shared.items() if k in cls.Options.model_fields}
        values.update(options.get(name, {}))  # a part's own key beats a plain one
        parts[name] = _parse_part(cls, values, sources(name, values))
    return Combination(parts, weights)


def options_record(loss: Loss) -> dict[str, dict[str, Any]]:
    """The loss's resolved options keyed by plugin, for ``run.json``: one loss's own; for a
    combination, its weights (a list, in part order) and each part's options."""
    if isinstance(loss, Combination):
        return {loss.name: {WEIGHTS: list(loss.options.weights)},
                **{name: part.options.model_dump(mode="json")
                   for name, part in loss.parts.items()}}
    return {loss.name: loss.options.model_dump(mode="json")}


def loss_label(loss: Loss) -> str:
    """The loss as the run's log names it: ``dpo``, or ``dpo (x1.0) + sft (x0.2)``."""
    return loss.label() if isinstance(loss, Combination) else loss.name
