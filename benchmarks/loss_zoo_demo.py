"""Every loss on the demo task, from the same SFT model: what each one teaches in a few steps.

    dpo demo --output runs/zoo-study                   # the SFT model (runs/zoo-study/sft/final)
    dpo sweep --grid loss=dpo,ipo,simpo,... --output runs/losses \\
        --model runs/zoo-study/sft/final --data demo --max-steps 20 --eval-steps 10 --lr 5e-6
    python benchmarks/loss_zoo_demo.py --sweep runs/losses --start runs/zoo-study/sft/final

The sweep trains one run per loss (each an ordinary ``dpo run``, its own options at their
defaults); this script scores the starting model and every point's ``final/`` with ``dpo demo``'s
comparison on the held-out questions (``dpo.core.training.study``), one model in memory at a
time, and prints one row per model:

* ``rank acc``: the share of held-out pairs whose chosen answer has the higher summed log-prob
  under the model itself (no reference): the one column comparable across losses, whatever
  their rewards mean (a reference-free loss's ``rewards/*`` are not log-ratios);
* ``answer acc``, ``in form``: the greedy reply is the right number; is one of the two numbers;
* ``logps/chosen``: the held-out mean summed log-prob of the chosen answers at the run's last
  evaluation (from its ``metrics.jsonl``): where it falls, the loss pushed probability away from
  the chosen answers as well as the rejected ones;
* ``train s``: the run's summed step times (training only, no loading or evaluation).

``--json FILE`` writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.training import study


def point_record(run: Path) -> dict:
    """The loss, status, last held-out logps/chosen and summed step time of a run directory."""
    record = json.loads((run / "run.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    evals = [r for r in rows if "eval/logps/chosen" in r]
    return {"loss": record["config"]["loss"], "status": record.get("status"),
            "logps_chosen": evals[-1]["eval/logps/chosen"] if evals else math.nan,
            "train_seconds": sum(r.get("step_time", 0.0) for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, required=True, help="a finished dpo sweep directory")
    parser.add_argument("--start", required=True, help="the model every point started from")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sweep = json.loads((args.sweep / "sweep.json").read_text())
    points = [args.sweep / p["directory"] if not Path(p["directory"]).is_absolute()
              else Path(p["directory"]) for p in sweep["points"]]
    done = [p for p in points if (p / "final").is_dir()]
    if not done:
        print(f"{args.sweep}: no finished point", file=sys.stderr)
        return 1
    records = {p: point_record(p) for p in done}
    models = [("start", args.start)] + [(records[p]["loss"], str(p / "final")) for p in done]
    catalog = collect(get_plugin_manager())
    comparison = study.compare(models, args.held_out, catalog, torch.device("cpu"),
                               announce=lambda line: print(line, file=sys.stderr))
    rows = []
    for score, (name, spec) in zip(comparison.scores, models):
        extra = records.get(Path(spec).parent, {})
        rows.append({"model": name, "rank_acc": score.ranking_accuracy,
                     "answer_acc": score.answer_accuracy, "in_form": score.answer_form,
                     "logps_chosen": extra.get("logps_chosen"),
                     "train_seconds": extra.get("train_seconds"),
                     "status": extra.get("status")})
    print("| loss | rank acc | answer acc | in form | held-out logps/chosen | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        logps = "" if r["logps_chosen"] is None else f"{r['logps_chosen']:.3f}"
        seconds = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"| {r['model']} | {r['rank_acc']:.3f} | {r['answer_acc']:.3f} | "
              f"{r['in_form']:.3f} | {logps} | {seconds} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"held_out": args.held_out, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
