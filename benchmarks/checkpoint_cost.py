"""What a checkpoint's manifest (a SHA-256 of every file) and its fsync cost, against writing it.

A checkpoint of a 135M-parameter model (SmolLM2-135M's shape, random float32 weights) holds
``model.safetensors`` and ``trainer_state.pt`` with AdamW's two moments, about 1.6 GB. Each
round writes one the way ``dpo.core.training.checkpoint.save_checkpoint`` does, timing apart: the write
itself (model, tokenizer, trainer state), the manifest (hashing every file just written), the
fsync of every file and directory, and ``verify`` (what resume does: sizes, then every digest
again). It prints the medians and the manifest's and fsync's share of the write.

Measured on a shared two-core VM (SHA-256 at about 0.9 GB/s, 5 rounds, medians of two runs):
write 1.94-1.99 s, manifest 1.62-1.84 s (0.81-0.95 of the write), fsync 0.63-0.64 s, verify
1.68-1.99 s. The page cache makes the write fast here; on a disk-bound write the share falls.
Hashing the files in parallel threads gained nothing on that machine, so it is serial.

    python benchmarks/checkpoint_cost.py                  # 3 rounds, under the system's temp
    python benchmarks/checkpoint_cost.py --dir /data/tmp --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def smollm2_135m_shaped(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    from dpo.core.training import checkpoint as ck
    from dpo.core.model.tiny import build_tiny_tokenizer

    model, tokenizer = smollm2_135m_shaped(), build_tiny_tokenizer()
    params = sum(p.numel() for p in model.parameters())
    optimizer_state = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                                     "exp_avg_sq": torch.rand_like(p)}
                                 for i, p in enumerate(model.parameters())}}
    tensors = {"optimizer": optimizer_state, "scheduler": {}, "rng": ck.rng_states(None)}
    root = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=args.dir))
    seconds: dict[str, list[float]] = {"write": [], "manifest": [], "fsync": [], "verify": []}
    size = 0
    try:
        for i in range(args.rounds):
            path = root / f"round-{i}"
            path.mkdir()
            started = time.perf_counter()
            ck._write_model(path, model, tokenizer)
            torch.save(tensors, path / "trainer_state.pt")
            (path / "trainer_state.json").write_text("{}\n")
            seconds["write"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ck.write_manifest(path)
            seconds["manifest"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ck.fsync_tree(path)
            seconds["fsync"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert ck.verify(path) is None
            seconds["verify"].append(time.perf_counter() - started)
            size = sum(f.stat().st_size for f in path.iterdir())
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"{params / 1e6:.1f}M parameters, checkpoint {size / 1e9:.2f} GB under {root.parent}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads")
    for name, label in (("write", "write (model, tokenizer, trainer state)"),
                        ("manifest", "manifest (SHA-256 of every file)"),
                        ("fsync", "fsync of every file and directory"),
                        ("verify", "verify on resume (sizes, digests)")):
        runs = seconds[name]
        print(f"{label:42s} {median[name]:6.2f} s median ({min(runs):.2f}-{max(runs):.2f})")
    print(f"manifest / write {median['manifest'] / median['write']:.2f}; fsync / write "
          f"{median['fsync'] / median['write']:.2f}; hashing {size / 1e6 / median['manifest']:.0f} "
          "MB/s")


if __name__ == "__main__":
    main()
