"""The three ways ``dpo.core.model.logps`` runs a batch of pairs, timed side by side in one process.

    padded   prompt + completion rows, right-padded to the batch's longest (``completion_logps``)
    shared   each prompt once, both completions on its keys and values (``rows_logps`` with
             ``share_prompt``: the groups of ``shared_prompt_plan``)
    packed   the rows' real tokens in one sequence, positions restarting per row
             (``packed_logps``); with the model's own attention implementation, which on CPU
             (sdpa) means transformers' block-diagonal mask, not a variable-length kernel

Each layout runs forward and backward of the summed log-probs on the same batches of HH-RLHF
pairs (file order), alternating layouts within each round so that drifts of the machine hit all
three alike; the table gives the median seconds per batch, the tokens each layout ran, and the
ratio to padded. The log-probs of the three are checked equal (1e-4 relative) on every batch.

    python benchmarks/layouts.py                          # 2 batches of 4 pairs, 2 rounds
    python benchmarks/layouts.py --batches 4 --rounds 3
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
LAYOUTS = ("padded", "shared", "packed")


def hh_pairs(data: Path, count: int) -> list[dict[str, str]]:
    """The first ``count`` usable HH-RLHF records as prompt/chosen/rejected text."""
    from dpo.core.interfaces.plugins import collect, get_plugin_manager
    from dpo.core.data.reading import load_pairs

    formats = collect(get_plugin_manager()).formats
    out = []
    for pair in load_pairs(data, formats, "hh"):
        out.append(pair)
        if len(out) == count:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    args = p.parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file (HH-RLHF JSONL.gz); pass --data")

    from dpo.core.data.batching import collate
    from dpo.core.model.logps import completion_logps, packed_logps, rows_logps, tokens_run
    from dpo.core.model.loading import load_model
    from dpo.core.model.paths import resolve
    from dpo.core.data.tokenization import tokenize_pairs

    model, tokenizer = load_model(args.model, seed=0)
    sourced = hh_pairs(args.data, args.batches * args.batch_size * 2)
    tokenized, _ = tokenize_pairs(tokenizer, sourced, args.max_length, args.max_prompt_length)
    size = args.batch_size
    batches = [collate(tokenized[i * size:(i + 1) * size], tokenizer.pad_token_id)
               for i in range(args.batches)]
    if any(b.num_pairs < size for b in batches):
        sys.exit(f"{args.data}: fewer than {args.batches * size} usable pairs")
    shared = resolve(model, share_prompt=True)
    padded = shared.without(["shared_prompt"], "compared")

    run = {
        "padded": lambda b: completion_logps(model, b.input_ids, b.attention_mask,
                                             b.completion_mask, padded),
        "shared": lambda b: rows_logps(model, b.input_ids, b.attention_mask, b.completion_mask,
                                       b.prompt_lengths, b.row_lengths, shared),
        "packed": lambda b: packed_logps(model, b.input_ids, b.prompt_lengths, b.row_lengths,
                                         padded),
    }
    tokens = {"padded": sum(b.padded_tokens for b in batches),
              "shared": sum(tokens_run(b, shared) for b in batches),
              "packed": sum(b.real_tokens for b in batches)}
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for batch in batches:
            values = {}
            for name in LAYOUTS:
                started = time.perf_counter()
                logps, _ = run[name](batch)
                logps.sum().backward()
                seconds[name].append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
                values[name] = logps.detach()
            for name in LAYOUTS[1:]:
                torch.testing.assert_close(values[name], values["padded"], rtol=1e-4, atol=1e-3)

    base = statistics.median(seconds["padded"])
    print(f"{args.model}, {args.batches} HH-RLHF batches of {size} pairs, {args.rounds} rounds, "
          f"forward + backward, {torch.get_num_threads()} threads, attention "
          f"{model.config._attn_implementation}")
    print(f"{'layout':8s} {'median s':>9s} {'(min-max)':>13s} {'tokens run':>11s} {'x padded':>9s}")
    for name in LAYOUTS:
        times = seconds[name]
        median = statistics.median(times)
        print(f"{name:8s} {median:9.2f} {f'({min(times):.1f}-{max(times):.1f})':>13s} "
              f"{tokens[name]:11d} {base / median:9.2f}")


if __name__ == "__main__":
    main()
