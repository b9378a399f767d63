"""Build a local lm-eval task from Anthropic HH-RLHF pairs (a JSONL or JSONL.gz file of
``{"chosen": dialogue, "rejected": dialogue}``): for each pair, the dialogue up to its last
"Assistant:" is the context and the two replies are the choices, the chosen one right.

``acc`` is then the share of pairs whose chosen reply the model finds more likely than the
rejected one (summed log-probability); ``acc_norm`` compares them per byte, so that a longer
reply is not penalised for its length. The data is read at build time and written beside the
YAML file: nothing of it goes into this repository.

    python examples/tasks/hh_task.py hh.jsonl.gz /tmp/hh-task --skip 1800 --pairs 100
    dpo eval --model out-sft/final --model out-dpo/final --tasks /tmp/hh-task
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

TURN = "\n\nAssistant:"

YAML = """# Built by examples/tasks/hh_task.py from {source} (pairs {first} to {last}).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def split(record: dict) -> dict | None:
    """{"context", "choices": [chosen reply, rejected reply]}, or None when the two dialogues
    do not share everything up to the chosen one's last assistant turn."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or TURN not in chosen:
        return None
    cut = chosen.rindex(TURN) + len(TURN)
    context = chosen[:cut]
    if not rejected.startswith(context) or chosen[cut:] == rejected[cut:]:
        return None
    return {"context": context, "choices": [chosen[cut:], rejected[cut:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="HH-RLHF pairs, JSONL or JSONL.gz")
    parser.add_argument("output", type=Path, help="the task directory to write")
    parser.add_argument("--skip", type=int, default=0, help="pairs to skip first (e.g. those "
                        "a run trained on)")
    parser.add_argument("--pairs", type=int, default=100, help="pairs in the task")
    parser.add_argument("--name", default="hh_harmless_pref", help="the task's name")
    args = parser.parse_args()
    opener = gzip.open if args.data.suffix == ".gz" else open
    docs = []
    with opener(args.data, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if number < args.skip or not line.strip():
                continue
            doc = split(json.loads(line))
            if doc is not None:
                docs.append(doc)
            if len(docs) == args.pairs:
                break
    if not docs:
        raise SystemExit(f"error: {args.data}: no usable pair after the first {args.skip}")
    args.output.mkdir(parents=True, exist_ok=True)
    data = (args.output / f"{args.name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (args.output / f"{args.name}.yaml").write_text(YAML.format(
        source=args.data.name, first=args.skip, last=args.skip + len(docs) - 1, name=args.name,
        data=json.dumps(str(data))), encoding="utf-8")
    print(f"{args.output}: task {args.name}, {len(docs)} pairs")


if __name__ == "__main__":
    main()
