"""The report's figures: each metric against the step, every run in one figure (a colour per
run), training as a line and evaluations as markers on a line of the same colour, the step a
stopping policy ended a run at and the step kept as best marked on every panel.

What goes into a figure is plain data (``figure_specs``, ``panel_series``, ``markers``), so that
it is tested without looking at pixels; ``draw`` turns it into a PNG with matplotlib's Agg
canvas, building ``Figure`` objects directly: pyplot, its global backend and its figure registry
are never touched, and every style setting stays inside an ``rc_context``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo.core.interfaces.errors import DpoError
from dpo.report.runs import STDERR, TASKS, Run

EXTRA_HINT = "pip install 'dpo-trainer[report]'"
DPI = 100


class MissingExtra(DpoError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(f"dpo report draws its figures with matplotlib, which is not "
                           f"installed: {EXTRA_HINT}") from None
    return matplotlib


@dataclass
class Panel:
    title: str
    key: str | None  # the training metric, if any
    eval_key: str | None  # the evaluation metric drawn on the same axes, if any
    ylabel: str
    log: bool = False  # a log y axis, when every value is positive
    bounds: tuple[float, float] | None = None  # a fixed y range (accuracies)
    from_zero: bool = False  # the y axis starts at 0 (amounts: a rate, memory, throughput)

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.key, self.eval_key) if k]


@dataclass
class FigureSpec:
    name: str  # the PNG's file name without .png
    title: str
    panels: list[Panel] = field(default_factory=list)
    share_y: bool = False  # the panels are two sides of one quantity (chosen, rejected)


def _single(name: str, title: str, key: str | None, ylabel: str, **kw: Any) -> FigureSpec:
    eval_key = kw.pop("eval_key", f"eval/{key}" if key else None)
    return FigureSpec(name, title, [Panel(title, key, eval_key, ylabel, **kw)])


def _pair(name: str, title: str, prefix: str, ylabel: str) -> FigureSpec:
    return FigureSpec(name, title, [
        Panel(f"{side}", f"{prefix}/{side}", f"eval/{prefix}/{side}", ylabel)
        for side in ("chosen", "rejected")], share_y=True)


# Every figure the report can draw, in the page's order; one that no run has a metric of is
# left out.
FIGURES = (
    _single("loss", "Loss", "loss", "loss"),
    _single("perplexity", "Perplexity (SFT)", "perplexity", "perplexity (log scale)", log=True),
    _single("rewards-accuracies", "Reward accuracy: chosen rewarded above rejected",
            "rewards/accuracies", "share of pairs", bounds=(-0.03, 1.03)),
    _single("rewards-margins", "Reward margin: chosen minus rejected reward",
            "rewards/margins", "β · log-ratio difference"),
    _pair("rewards", "Implicit rewards: β · log(policy / reference)", "rewards", "reward"),
    _pair("logps", "Log-probabilities of the completions under the policy", "logps",
          "log-prob, summed over the completion"),
    _single("grad-norm", "Gradient norm (before clipping)", "grad_norm", "L2 norm", eval_key=None),
    _single("lr", "Learning rate", "lr", "learning rate", eval_key=None, from_zero=True),
    _single("throughput", "Training throughput", "tokens_per_second", "tokens / s (unpadded)",
            eval_key=None, from_zero=True),
    _single("memory", "Peak memory per process", "peak_memory_gb", "GiB", eval_key=None,
            from_zero=True),
)


def figure_specs(runs: list[Run]) -> list[FigureSpec]:
    """The figures some run has data for; downstream scores, if any, last, a panel each."""
    specs = []
    for spec in FIGURES:
        panels = [p for p in spec.panels if any(r.has(k) for r in runs for k in p.keys)]
        if panels:
            specs.append(FigureSpec(spec.name, spec.title, panels, spec.share_y))
    tasks = sorted({k for r in runs for k in r.task_keys()})
    if tasks:
        specs.append(FigureSpec("downstream", "Downstream evaluation scores", [
            Panel(k.removeprefix(TASKS), None, k, "score") for k in tasks]))
    return specs


@dataclass
class Series:
    run: Run
    kind: str  # "train" or "eval"
    key: str
    steps: list[int]
    values: list[float]
    errors: list[float] | None = None  # standard errors (downstream scores)


def panel_series(runs: list[Run], panel: Panel) -> list[Series]:
    """What a panel draws: per run, its training series and its evaluation series."""
    out = []
    for run in runs:
        for kind, key in (("train", panel.key), ("eval", panel.eval_key)):
            if not key:
                continue
            steps, values = run.series(key)
            if not steps:
                continue
            errors = None
            if key.startswith(TASKS):
                by_step = dict(zip(*run.series(key + STDERR)))
                errors = [by_step.get(s, math.nan) for s in steps]
            out.append(Series(run, kind, key, steps, values, errors))
    return out


@dataclass
class Marker:
    run: Run
    kind: str  # "stopped", "paused" or "best"
    step: int
    text: str  # for the legend: "stopped (early-stopping)", "best step (restored)"


LINE_STYLES = {"stopped": "--", "paused": "-."}  # the vertical line at a run's end


def markers(runs: list[Run]) -> list[Marker]:
    """The steps marked on every panel: where a stopping policy ended a run or paused it (for
    ``--resume``), and the evaluation kept as best (restored as the final weights, or the best
    so far)."""
    out = []
    for run in runs:
        for kind, ended in (("stopped", run.stopped), ("paused", run.paused)):
            if ended:
                step, policy = ended
                out.append(Marker(run, kind, step, f"{kind} by {policy}"))
        if run.best:
            step, restored = run.best
            watched = run.best_metric
            what = f"best {watched}" if watched else "best step"
            out.append(Marker(run, "best", step,
                              f"{what}, restored as final" if restored else f"{what} so far"))
    return out


# -- drawing -----------------------------------------------------------------------------------

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.frameon": False,
}
GREY = "0.35"


def colours(runs: list[Run]) -> dict[int, Any]:
    """One colour per run (matplotlib's tab10, then tab20 beyond ten runs)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {id(r): cmap(i % cmap.N) for i, r in enumerate(runs)}


def draw(spec: FigureSpec, runs: list[Run], labels: dict[int, str], path: Path) -> None:
    """Write ``spec`` for ``runs`` as a PNG at ``path``; ``labels``: each run's legend text."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colour = colours(runs)
    marks = markers(runs)
    columns = min(len(spec.panels), 3)
    rows = math.ceil(len(spec.panels) / columns)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8.0 if columns == 1 else 4.6 * columns, 3.4 * rows + 1.1),
                     layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, columns, squeeze=False, sharey=spec.share_y)
        used: dict[str, Any] = {}  # the style entries of the legend, as they are drawn
        for ax, panel in zip(axes.flat, spec.panels):
            drawn_values: list[float] = []
            series = panel_series(runs, panel)
            # Training faint beside evaluations, the held-out curve being the one to read.
            faint = 0.55 if any(s.kind == "eval" for s in series) else 1.0
            for s in series:
                drawn_values += s.values
                c = colour[id(s.run)]
                if s.kind == "train":
                    ax.plot(s.steps, s.values, color=c, linewidth=1.3, alpha=faint,
                            marker="o" if len(s.steps) == 1 else None)  # one step: a dot
                    used.setdefault("train", Line2D([], [], color=GREY, linewidth=1.3,
                                                    alpha=faint))
                else:
                    ax.plot(s.steps, s.values, color=c, linewidth=1.8, marker="o",
                            markersize=5.5, markeredgecolor="white", markeredgewidth=0.7)
                    if s.errors is not None:
                        ax.errorbar(s.steps, s.values, yerr=[0 if math.isnan(e) else e
                                                             for e in s.errors],
                                    fmt="none", ecolor=c, elinewidth=1, capsize=3)
                    used.setdefault("eval", Line2D([], [], color=GREY, linewidth=1.8,
                                                   marker="o", markersize=5.5))
            drawn = {id(s.run) for s in series}
            for m in marks:
                if id(m.run) not in drawn:
                    continue
                c = colour[id(m.run)]
                if m.kind in LINE_STYLES:  # stopped: dashed; paused: dash-dot
                    style = LINE_STYLES[m.kind]
                    ax.axvline(m.step, color=c, linestyle=style, linewidth=1.1, alpha=0.8)
                    used.setdefault(m.text, Line2D([], [], color=GREY, linestyle=style,
                                                   linewidth=1.1))
                else:
                    ax.axvline(m.step, color=c, linestyle=":", linewidth=1.3, alpha=0.9)
                    steps, values = m.run.series(panel.eval_key) if panel.eval_key else ([], [])
                    star = m.step in steps
                    if star:
                        ax.plot([m.step], [values[steps.index(m.step)]], marker="*",
                                markersize=13, color=c, markeredgecolor="black",
                                markeredgewidth=0.6, linestyle="none", zorder=5)
                    used.setdefault(m.text, Line2D([], [], color=GREY, linestyle=":",
                                                   linewidth=1.3, marker="*" if star else None,
                                                   markersize=11, markeredgecolor="black",
                                                   markeredgewidth=0.6))
            _axes(ax, panel, spec, MaxNLocator, drawn_values)
        for ax in list(axes.flat)[len(spec.panels):]:
            ax.set_visible(False)
        fig.suptitle(spec.title, fontsize=12, fontweight="bold")
        handles = [Line2D([], [], color=colour[id(r)], linewidth=3) for r in runs
                   if any(panel_series([r], p) for p in spec.panels)]
        names = [labels[id(r)] for r in runs if any(panel_series([r], p) for p in spec.panels)]
        handles += list(used.values())
        names += list(used)
        # Below the axes, never over the data: the runs first, then what each line style means.
        _legend(fig, handles, names)
        fig.savefig(path, dpi=DPI)


def _legend(fig: Any, handles: list[Any], names: list[str]) -> None:
    """The legend below the axes in as few rows as fit the figure's width, measured."""
    renderer = fig.canvas.get_renderer()
    for ncols in range(len(names), 0, -1):
        legend = fig.legend(handles, names, loc="outside lower center", ncols=ncols)
        if ncols == 1 or legend.get_window_extent(renderer).width <= 0.97 * fig.bbox.width:
            return
        legend.remove()


def _axes(ax: Any, panel: Panel, spec: FigureSpec, locator: Any, values: list[float]) -> None:
    if len(spec.panels) > 1:
        ax.set_title(panel.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(locator(integer=True))
    if panel.bounds:
        ax.set_ylim(*panel.bounds)
    elif panel.from_zero:
        ax.set_ylim(bottom=0)
    if panel.log:
        finite = [v for v in values if not math.isnan(v)]
        if finite and min(finite) > 0:
            ax.set_yscale("log")
