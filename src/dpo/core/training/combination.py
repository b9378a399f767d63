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

import math
from typing import Any, Mapping

import torch

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.plugins import Catalog
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


def parse_weights(value: Any, names: list[str], loss: str) -> list[float]:
    """``weights`` as given (``"1.0,0.2"`` from ``-o``, a TOML list or string), checked: one
    per loss, finite, >= 0, not all 0. A one-line error otherwise."""
    where = f"loss {loss!r}: option weights={_shown(value)}"
    example = ",".join(["1.0"] * len(names))
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    try:
        weights = [float(item) for item in items]
    except (TypeError, ValueError):
        raise UsageError(f"{where}: not a list of numbers; give one per loss, comma-separated "
                         f"(e.g. -o weights={example})") from None
    if len(weights) != len(names):
        raise UsageError(f"{where}: {len(weights)} weight(s) for {len(names)} losses "
                         f"({', '.join(names)}); give one per loss, in --loss order (e.g. -o "
                         f"weights={example})")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise UsageError(f"{where}: each weight must be a finite number >= 0")
    if not any(weights):
        raise UsageError(f"{where}: every weight is 0; at least one must be above 0")
    return weights


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def resolve_loss(loss: str, options: Mapping[str, Mapping[str, Any]], catalog: Catalog,
                 asked: bool = True) -> Loss:
    """The ``Loss`` a run with loss string ``loss`` and plugin ``options`` (keyed by plugin
    name, as ``RunConfig.options``) trains with: the registered class for one name, a
    ``Combination`` for ``a+b+...``. Options are validated here, before anything is written.
    ``asked``: the user named the loss (see ``dpo.core.interfaces.registry``)."""
    names = loss_names(loss)
    if len(names) == 1:
        cls = catalog.losses.get(loss, asked=asked)
        if WEIGHTS in options.get(loss, {}) and WEIGHTS not in cls.Options.model_fields:
            raise UsageError(f"loss {loss!r}: option {WEIGHTS} weighs losses trained together; "
                             f"give --loss more than once (e.g. --loss {loss} --loss ipo), or "
                             "drop it")
        return plugin_call(cls, "__init__", cls, cls.parse_options(dict(options.get(loss, {}))))
    if "" in names:
        raise UsageError(f"--loss {loss!r}: an empty loss name; name each loss (e.g. --loss dpo "
                         "--loss ipo)")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise UsageError(f"loss {twice!r} is named twice ({loss}; --loss, or the config "
                         "file's loss list); name each loss once, and set its share with -o "
                         "weights=...")
    classes = {name: catalog.losses.get(name, asked=asked) for name in names}
    unpaired = next((n for n, cls in classes.items() if cls.examples != "pairs"), None)
    if unpaired is not None:
        raise UsageError(f"loss {unpaired!r} trains on unpaired examples ({classes[unpaired].examples}"
                         f"), the other losses of {loss!r} on preference pairs: they cannot be "
                         f"trained together; run --loss {unpaired} alone")
    shared = dict(options.get(loss, {}))
    weights = parse_weights(shared.pop(WEIGHTS), names, loss) if WEIGHTS in shared else None
    for key in shared:
        if not any(key in cls.Options.model_fields for cls in classes.values()):
            declared = "; ".join(f"{name}: {', '.join(sorted(cls.Options.model_fields)) or 'none'}"
                                 for name, cls in classes.items())
            raise UsageError(f"loss {loss!r}: option {key!r} belongs to none of its parts "
                             f"({declared}; and {WEIGHTS}); fix the name, or qualify it as "
                             f"-o {names[0]}.KEY=...")
    parts: dict[str, Loss] = {}
    for name, cls in classes.items():
        values = {k: v for k, v in shared.items() if k in cls.Options.model_fields}
        values.update(options.get(name, {}))  # a part's own key beats a plain one
        parts[name] = plugin_call(cls, "__init__", cls, cls.parse_options(values))
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
