"""What the check of the speed paths on real data costs, against the training step it guards.

A run checks its paths once, before the reference pass: the first pairs of its first batch
(``dpo.core.model.paths.CHECK_PAIRS``) scored on the paths and each sequence alone (the plain path),
without a gradient (``dpo.core.model.pathcheck.check``). This times that check and, on the same pairs, one
training step's forward and backward on the same paths, alternately in one process, and prints
both medians and their ratio: the check costs that many steps, once per run.

    python benchmarks/check_cost.py                     # SmolLM2, 4 HH-RLHF pairs, 3 rounds
    python benchmarks/check_cost.py --model tiny --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test-2000.jsonl.gz"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    args = p.parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file (HH-RLHF JSONL.gz); pass --data")

    sys.path.insert(0, str(REPO / "benchmarks"))
    from layouts import hh_pairs

    from dpo.core.data.batching import collate
    from dpo.core.model.dropout import disable_dropout
    from dpo.core.model.logps import batch_logps
    from dpo.core.model.loading import load_model
    from dpo.core.model.pathcheck import CHECK_PAIRS, check
    from dpo.core.model.paths import resolve
    from dpo.core.data.tokenization import tokenize_pairs

    model, tokenizer = load_model(args.model, seed=0)
    disable_dropout(model)
    pairs, _ = tokenize_pairs(tokenizer, hh_pairs(args.data, CHECK_PAIRS * 2), args.max_length,
                              args.max_prompt_length)
    batch = collate(pairs[:CHECK_PAIRS], tokenizer.pad_token_id)
    paths = resolve(model, share_prompt_default=True, backend_name="cpu")  # the CPU default
    seconds: dict[str, list[float]] = {"check": [], "step": []}
    for _ in range(args.rounds):
        model.train()
        started = time.perf_counter()
        checked, report = check(model, batch, paths)
        seconds["check"].append(time.perf_counter() - started)
        assert checked == paths and not report.turned_off, report
        started = time.perf_counter()
        logps, _ = batch_logps(model, batch, paths)
        logps.sum().backward()
        seconds["step"].append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)

    check_s, step_s = (statistics.median(seconds[k]) for k in ("check", "step"))
    print(f"{args.model}, {batch.num_pairs} HH-RLHF pairs ({batch.real_tokens} tokens, longest "
          f"row {max(batch.row_lengths)}), paths {', '.join(paths.used())}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"check (paths + each sequence alone, no gradient)  {check_s:6.2f} s median "
          f"({min(seconds['check']):.2f}-{max(seconds['check']):.2f})")
    print(f"training forward + backward, same pairs and paths {step_s:6.2f} s median "
          f"({min(seconds['step']):.2f}-{max(seconds['step']):.2f})")
    print(f"the check costs {check_s / step_s:.2f} of a step, once per run; largest log-prob "
          f"difference from the plain path {report.max_difference:.2g} nats")


if __name__ == "__main__":
    main()
