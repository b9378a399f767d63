"""Reference log-probabilities computed once, before training, and kept on disk.

The reference model of DPO is frozen, so its log-probs of each pair never change during a run:
computing them once up front takes the reference forward out of every step and the reference
model out of memory while training. The same file serves every later run with the same
reference model, whatever the loss, beta or learning rate (a sweep pays for it once).

The file (safetensors, written atomically) holds, for each pair, the reference's summed
log-probs of the chosen and of the rejected completion:

- ``digests``: uint8 [N, 16], the BLAKE2b digest of the pair's token ids (prompt, chosen,
  rejected). Tokenizer, data, chat template and length settings all act through the token ids,
  so a pair whose ids changed in any way is simply not in the file and gets computed.
- ``logps``: float32 [N, 2], the chosen and rejected log-probs.
- metadata: ``format`` ("dpo-ref-logps"), ``version``, ``model_digest`` (BLAKE2b of the
  reference's parameter names, shapes, dtypes and values), ``dtype`` (the compute dtype),
  ``paths`` (the speed paths that computed them, of ``dpo.core.model.paths.VALUE_PATHS``), ``model``
  (where the weights came from, for people), ``device``.

A file made with other weights, another compute dtype or another format version is stale, and
so is one computed on other speed paths than the run's: on a path not exact for this model
(found wrong after the file was made, by a newer architecture table or by the check on real
data), or on exact ones that round differently (so that at step 1 the policy, still the
reference, reproduces every value bit for bit: no pair ranked right or wrong by rounding). It
is rebuilt (and the run says so), never read. The default file is one per reference model,
dtype and set of paths. Format version 1 files did not record their paths: rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from dpo.core.training.checkpoint import durable_replace, fsync_path
from dpo.core.model import lora
from dpo.core.model.loading import cache_dir

if TYPE_CHECKING:
    from dpo.core.interfaces.backend import Backend
    from dpo.core.model.paths import Paths
    from dpo.core.data.tokenization import TokenizedPair

FORMAT = "dpo-ref-logps"
VERSION = "2"
SUFFIX = ".safetensors"


def pair_digest(pair: TokenizedPair) -> bytes:
    """16 bytes that change whenever any of the pair's token ids do."""
    h = hashlib.blake2b(digest_size=16)
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.digest()


def model_digest(model: torch.nn.Module) -> str:
    """BLAKE2b over the model's parameters and buffers in name order: names, shapes, dtypes
    and values (about 1 GB/s; weights on an accelerator are copied to the host in turn). A
    model carrying a LoRA adapter is digested as its base (the reference it scores as)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(lora.base_state_dict(model).items()):
        t = tensor.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_path(digest: str, dtype: torch.dtype, paths: list[str]) -> Path:
    """Where a reference's log-probs live unless a file is named: the cache directory, one file
    per reference model, compute dtype and set of value paths (``Paths.values_key``)."""
    tag = hashlib.blake2b(",".join(paths).encode(), digest_size=4).hexdigest()
    return (cache_dir() / "ref-logps"
            / f"{digest}-{str(dtype).removeprefix('torch.')}-{tag}{SUFFIX}")


@dataclass
class RefLogps:
    """pair digest -> (chosen, rejected) reference log-probs, for one reference and dtype."""

    model_digest: str
    dtype: str
    values: dict[bytes, tuple[float, float]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def missing(self, pairs: list[TokenizedPair], seen: set[bytes] | None = None
                ) -> list[TokenizedPair]:
        """The pairs (each once) whose log-probs are not in the table. ``seen`` holds the
        digests already taken (by earlier calls sharing it) and gains these."""
        seen = set() if seen is None else seen
        out = []
        for pair in pairs:
            key = pair_digest(pair)
            if key not in self.values and key not in seen:
                seen.add(key)
                out.append(pair)
        return out

    def lookup(self, pairs: list[TokenizedPair]) -> torch.Tensor:
        """[2B] float32: the chosen log-probs of ``pairs``, then their rejected ones (the row
        order of a ``Batch``)."""
        try:
            rows = [self.values[pair_digest(p)] for p in pairs]
        except KeyError:
            raise KeyError("a pair has no reference log-probs in the table") from None
        return torch.tensor([c for c, _ in rows] + [r for _, r in rows], dtype=torch.float32)


def read(path: Path) -> RefLogps | None:
    """The table in ``path``; None when the file is absent or not a readable table."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            digests, logps = f.get_tensor("digests"), f.get_tensor("logps")
    except Exception:  # unreadable or not ours: absent, so it gets rebuilt
        return None
    if meta.get("format") != FORMAT or digests.ndim != 2 or logps.shape != (digests.shape[0], 2):
        return None
    values = {bytes(d.tolist()): (float(c), float(r))
              for d, (c, r) in zip(digests, logps.tolist())}
    return RefLogps(meta.get("model_digest", ""), meta.get("dtype", ""), values, meta)


def write(path: Path, table: RefLogps) -> None:
    """Write ``table`` to ``path`` atomically (a temporary file renamed over it)."""
    from safetensors.torch import save_file

    keys = list(table.values)
    digests = (torch.tensor([list(k) for k in keys], dtype=torch.uint8) if keys
               else torch.zeros(0, 16, dtype=torch.uint8))
    logps = (torch.tensor([table.values[k] for k in keys], dtype=torch.float32) if keys
             else torch.zeros(0, 2, dtype=torch.float32))
    meta = {**table.meta, "format": FORMAT, "version": VERSION,
            "model_digest": table.model_digest, "dtype": table.dtype, "pairs": str(len(keys))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"digests": digests, "logps": logps}, tmp, metadata=meta)
        fsync_path(Path(tmp))  # the contents on disk before the name points at them
        durable_replace(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recorded_paths(table: RefLogps) -> list[str]:
    """The speed paths that scored ``table``."""
    return [name for name in table.meta.get("paths", "").split(",") if name]


def stale_reason(table: RefLogps, digest: str, dtype: str, paths: list[str] | None = None,
                 trusted: frozenset[str] | None = None) -> str | None:
    """Why ``table`` cannot serve this reference, or None when it can. ``paths``: the value
    paths of this run (None: any); ``trusted``: the speed paths exact for this reference model
    (None: any)."""
    if table.meta.get("version") != VERSION:
        return f"format version {table.meta.get('version')!r}, not {VERSION}"
    if table.model_digest != digest:
        return "made with other reference weights"
    if table.dtype != dtype:
        return f"computed in {table.dtype}, not {dtype}"
    recorded = recorded_paths(table)
    wrong = [name for name in recorded if trusted is not None and name not in trusted]
    if wrong:
        return f"scored on the {', '.join(wrong)} path, not exact for this model"
    if paths is not None and sorted(recorded) != sorted(paths):
        return (f"scored on {', '.join(recorded) or 'the plain path'}, this run takes "
                f"{', '.join(paths) or 'the plain path'}, which round differently")
    return None


def compute(model: torch.nn.Module, batches: list[list[TokenizedPair]], *, backend: Backend,
            device: torch.device, dtype: torch.dtype, pad_token_id: int, paths: Paths,
            progress: Callable[[int], None] | None = None
            ) -> dict[bytes, tuple[float, float]]:
    """The reference log-probs of the pairs of ``batches``, scored batch by batch under no_grad
    and the run's autocast. Given the batches training will see first, each pair is scored in
    the company it will be trained in, so at the first step the policy, still equal to the
    reference, reproduces these values bit for bit (rewards exactly 0)."""
    from dpo.core.data.batching import collate
    from dpo.core.model.logps import batch_logps

    was_training = model.training
    model.eval()
    out: dict[bytes, tuple[float, float]] = {}
    try:
        with torch.no_grad():
            for chunk in batches:
                batch = collate(chunk, pad_token_id, pad_length=backend.padded_length).to(device)
                with backend.autocast(dtype):
                    logps, _ = batch_logps(model, batch, paths)
                backend.materialize()
                values = logps.float().cpu().tolist()
                b = len(chunk)
                for i, pair in enumerate(chunk):
                    out[pair_digest(pair)] = (values[i], values[b + i])
                if progress:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return out


def ensure(path: Path | None, model: torch.nn.Module, batches: list[list[TokenizedPair]], *,
           backend: Backend, device: torch.device, dtype: torch.dtype, pad_token_id: int,
           paths: Paths, trusted: frozenset[str] | None = None, describe: str = "",
           share: Callable[[dict], dict] | None = None,
           is_main: bool = True, info: Callable[[str], None] = lambda _: None,
           progress: Callable[[int], None] | None = None) -> tuple[RefLogps, Path, int]:
    """The table of the pairs of ``batches`` for this reference ``model``: read from ``path``
    (default: the cache directory), the missing pairs computed (in these batches, less the
    pairs already known) and the file updated; a stale file is rebuilt. Returns the table, its
    file and how many pairs were computed (over all processes).

    ``paths``: the speed paths to score on; ``trusted``: those exact for this model, so that a
    file scored on another is rebuilt. ``share`` spreads the work over processes: each scores
    its own batches and ``share`` merges every rank's values.
    """
    digest = model_digest(model)
    dtype_name = str(dtype).removeprefix("torch.")
    value_paths = paths.values_key()
    path = path or default_path(digest, dtype, value_paths)
    table = read(path) if path.is_file() else None
    if table is not None and (reason := stale_reason(table, digest, dtype_name, value_paths,
                                                     trusted)):
        info(f"reference log-probs: {path} is stale ({reason}); rebuilding it")
        table = None
    table = table or RefLogps(digest, dtype_name, {}, {})
    pairs = [pair for batch in batches for pair in batch]
    todo: list[list[TokenizedPair]] = []
    scheduled: set[bytes] = set()
    for batch in batches:
        if keep := table.missing(batch, scheduled):
            todo.append(keep)
    count = len({pair_digest(p) for p in pairs})
    if share is None and not scheduled:
        info(f"reference log-probs: all {count} pairs read from {path}")
        return table, path, 0
    info(f"reference log-probs: computing {len(scheduled)} pairs"
         + (f", {count - len(scheduled)} read from {path}" if len(scheduled) < count else "")
         + "; the reference model is then not kept in memory")
    new = compute(model, todo, backend=backend, device=device, dtype=dtype,
                  pad_token_id=pad_token_id, paths=paths, progress=progress)
    if share is not None:
        new = share(new)
    if new:
        table.values.update(new)
        table.meta.update({"model": describe, "device": backend.describe(),
                           "paths": ",".join(value_paths)})
        if is_main:
            write(path, table)
    return table, path, len(new)
