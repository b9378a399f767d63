"""Full fine-tuning against LoRA on the default model, side by side on real data.

Runs ``dpo run`` once per variant, one after another, each in its own process (for its own peak
memory), on the same HH-RLHF pairs in file order, with the same flags as
``benchmarks/techniques.py`` (whose ``run_variant`` it calls: ``--backend cpu --dtype float32``,
4 pairs a step, no shuffle, no length grouping), and prints one table: trainable parameters,
median step time (the first step left out: warm-up), real tokens/s, peak resident memory, and
the size on disk of the run's last checkpoint (weights or adapter, AdamW's state over what
trains, tokenizer) and of its ``final/`` (the full model, or the adapter alone), each as a ratio
to the first variant (``full`` unless ``--only`` says otherwise). Peak memory is the process's
peak resident set: on CPU it also counts freed heap that the C library keeps, which is why LoRA's
saving shows most clearly with ``--gradient-checkpointing`` (README, "LoRA: what it saves").

    python benchmarks/lora_memory.py                       # all variants, 5 steps each
    python benchmarks/lora_memory.py --steps 3 --only full lora-r16

Variants (each adds to the flags above):
    full                    every weight trains: gradients and AdamW's two moments for all of them
    lora-r16                --lora -o lora.r=16 (alpha 32, every linear layer of the decoder)
    lora-r128               --lora -o lora.r=128: the rank of the BTLM-chat DPO recipe
    full-checkpointing      full + --gradient-checkpointing
    lora-r16-checkpointing  lora-r16 + --gradient-checkpointing

Every variant keeps the default DPO reference: log-probs scored once before training (each
variant scores its own file, so each does the same one-off work), after which no reference is
in memory and no reference forward runs in a step. That is the fair comparison of the training
itself; with ``--no-precompute-ref`` the two would differ more: full fine-tuning keeps a frozen
copy of the model (another float32 copy of the weights) while LoRA's reference is the same model
with its adapter switched off (no copy), and both then pay a reference forward every step.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from techniques import parse_args, run_variants  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "lora-r16": ["--lora", "-o", "lora.r=16"],
    "lora-r128": ["--lora", "-o", "lora.r=128"],
    "full-checkpointing": ["--gradient-checkpointing"],
    "lora-r16-checkpointing": ["--lora", "-o", "lora.r=16", "--gradient-checkpointing"],
}


def size_mib(directory: Path) -> float:
    """Every file under ``directory``, in MiB."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def weight_count(path: Path) -> int:
    """The number of values in a safetensors file, read from its header alone."""
    with path.open("rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return sum(math.prod(entry["shape"]) for name, entry in header.items()
               if name != "__metadata__")


def disk_figures(out: Path) -> dict:
    """Trainable parameters and the sizes of the last checkpoint and of final/."""
    adapter = json.loads((out / "run.json").read_text())["resolved"].get("lora")
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if adapter:
        trainable = adapter["trainable_parameters"]
    else:  # every weight trains: count them in the saved model (a tied weight once)
        trainable = weight_count(out / "final" / "model.safetensors")
    return {"trainable": trainable, "checkpoint_mib": size_mib(checkpoints[-1]),
            "final_mib": size_mib(out / "final")}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], VARIANTS)
    rows = run_variants(args, VARIANTS, "dpo-lora-memory-", figures=disk_figures)
    base = rows[0]
    print(f"\n{args.model}, HH-RLHF, batch {args.batch_size} pairs, max length {args.max_length}, "
          f"{args.steps} steps (median of steps 2..{args.steps}), {os.cpu_count()} CPUs; "
          f"x: ratio to {base['variant']}")
    header = (f"{'variant':<24}{'trainable':>13}{'x':>7}{'step s':>8}{'(min-max)':>13}"
              f"{'tokens/s':>10}{'x':>6}{'peak GiB':>10}{'x':>6}{'ckpt MiB':>10}{'x':>7}"
              f"{'final MiB':>11}{'x':>7}{'loss 1':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        spread = f"({r['step_min']:.1f}-{r['step_max']:.1f})"
        print(f"{r['variant']:<24}{r['trainable']:>13,}{r['trainable'] / base['trainable']:>7.3f}"
              f"{r['step_s']:>8.2f}{spread:>13}"
              f"{r['tokens_s']:>10.1f}{r['tokens_s'] / base['tokens_s']:>6.2f}"
              f"{r['peak_gb']:>10.2f}{r['peak_gb'] / base['peak_gb']:>6.2f}"
              f"{r['checkpoint_mib']:>10.1f}{r['checkpoint_mib'] / base['checkpoint_mib']:>7.3f}"
              f"{r['final_mib']:>11.1f}{r['final_mib'] / base['final_mib']:>7.3f}"
              f"{r['first_loss']:>8.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
