"""What the per-step check that the weights are still finite costs, against the step itself.

After every optimizer step a run checks that no parameter and no AdamW moment became nan or
infinite (``dpo.core.training.strategy.nonfinite_flag``: one fused 2-norm, whose value travels with the
next step's metrics; here it is read at once, a host read on top), so that weights from a
diverged update are never saved. This times that check and one training
step (forward and backward of a batch, then AdamW's update) of a 135M-parameter model of
SmolLM2-135M's shape (random float32 weights, random token ids: 4 pairs, 8 rows of
``--tokens`` tokens), alternately in one process, and prints both medians and their ratio.

Measured on a shared two-core VM (2 threads, 3 rounds, while another job ran): step 41.2 s,
check 0.17 s median: 0.0042 of a step. A max-magnitude reduction in its place took 3.55 s
(0.082 of a step): the fused 2-norm is what makes the check cheap.

    python benchmarks/finite_check.py                    # 5 rounds, rows of 384 tokens
    python benchmarks/finite_check.py --rounds 10 --tokens 256 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO / "benchmarks"))
    from checkpoint_cost import smollm2_135m_shaped

    from dpo.core.training import strategy as strat

    device = torch.device(args.device)
    model = smollm2_135m_shaped().to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (8, args.tokens), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds: dict[str, list[float]] = {"step": [], "check": []}
    for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        step = time.perf_counter() - started
        started = time.perf_counter()
        assert strat.nonfinite_flag(params, optimizer).item() == 0.0
        check = time.perf_counter() - started
        if round_:
            seconds["step"].append(step)
            seconds["check"].append(check)

    step_s, check_s = (statistics.median(seconds[k]) for k in ("step", "check"))
    count = sum(p.numel() for p in params)
    print(f"SmolLM2-135M-shaped ({count:,} parameters, AdamW: 3 x {count * 4 / 2**20:.0f} MiB "
          f"checked), 8 rows x {args.tokens} tokens, {device}, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds")
    print(f"training step (forward, backward, AdamW)   {step_s * 1e3:9.1f} ms median "
          f"({min(seconds['step']) * 1e3:.1f}-{max(seconds['step']) * 1e3:.1f})")
    print(f"nonfinite_flag (params and AdamW moments)  {check_s * 1e3:9.1f} ms median "
          f"({min(seconds['check']) * 1e3:.1f}-{max(seconds['check']) * 1e3:.1f})")
    print(f"the check costs {check_s / step_s:.4f} of a step")


if __name__ == "__main__":
    main()
