"""Token ids to padded tensors, and the order of batches: deterministic, resumable, per rank."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch

from dpo.core.data.tokenization import TokenizedExample, TokenizedPair


class RefTable(Protocol):
    """Precomputed reference log-probs (``dpo.core.training.refcache.RefLogps``)."""

    def lookup(self, pairs: list[TokenizedPair]) -> torch.Tensor:
        """[2B] float32: the chosen sides' values, then the rejected sides', in ``pairs``' order."""


@dataclass(frozen=True)
class Batch:
    """Right-padded rows of token ids, scored in one forward. A batch of B pairs (``collate``,
    ``paired``) has 2B rows: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones
    of the same pairs in the same order, so one forward serves both sides. A batch of N examples
    for supervised fine-tuning (``collate_examples``) has one row per example.

    ``completion_mask[i, t]`` is True where token t of row i is trained: a completion token (EOS
    included), not in an example's untrained span; its log-probability is read from the logits
    at t - 1. Prompt and padding are False.
    """

    input_ids: torch.Tensor  # [R, T] int64
    attention_mask: torch.Tensor  # [R, T] int64, 1 for real tokens
    completion_mask: torch.Tensor  # [R, T] bool
    # [R] float32 reference log-probs read from a precomputed table, in the same row order;
    # None when the reference model scores the batch itself (or none is needed).
    ref_logps: torch.Tensor | None = None
    # Counted on the host when collated, so reading them later costs no device sync.
    row_lengths: tuple[int, ...] = field(default=(), repr=False, compare=False)  # real tokens
    # Each row's prompt tokens, where every trained token is after them (one completion suffix
    # per row, what the shared-prompt and packed paths assume); () where a row has holes.
    prompt_lengths: tuple[int, ...] = field(default=(), repr=False, compare=False)
    completion_tokens: int = field(default=0, repr=False, compare=False)  # trained tokens
    paired: bool = True  # rows are pairs' chosen then rejected sides (else one per example)

    @property
    def rows(self) -> int:
        """Sequences in the batch: 2B for B pairs, N for N examples."""
        return self.input_ids.shape[0]

    @property
    def num_pairs(self) -> int:
        """Pairs in a batch of pairs (half its rows)."""
        return self.input_ids.shape[0] // 2

    @property
    def real_tokens(self) -> int:
        if not self.row_lengths:
            return int(self.attention_mask.sum())
        return sum(self.row_lengths)

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def select(self, units: list[int]) -> Batch:
        """The sub-batch of these pairs (of these examples, in a batch of examples; indices in
        order), cut to its own longest row."""
        if self.paired:
            rows, width = pair_rows(units, self.row_lengths)
        else:
            rows, width = list(units), max(self.row_lengths[r] for r in units)
        index = torch.tensor(rows, device=self.input_ids.device)
        completion_mask = self.completion_mask[index, :width]
        if self.prompt_lengths:
            trained = sum(self.row_lengths[r] - self.prompt_lengths[r] for r in rows)
        else:  # rows with holes: counted from the mask (a device read)
            trained = int(completion_mask.sum())
        return Batch(self.input_ids[index, :width], self.attention_mask[index, :width],
                     completion_mask,
                     ref_logps=None if self.ref_logps is None else self.ref_logps[index],
                     row_lengths=tuple(self.row_lengths[r] for r in rows),
                     prompt_lengths=tuple(self.prompt_lengths[r] for r in rows
                                          if self.prompt_lengths),
                     completion_tokens=trained, paired=self.paired)

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device),
                       completion_mask=self.completion_mask.to(device),
                       ref_logps=None if self.ref_logps is None else self.ref_logps.to(device))


def pair_rows(pairs: list[int], row_lengths: tuple[int, ...]) -> tuple[list[int], int]:
    """The rows of these pairs in a batch whose rows have ``row_lengths`` (chosen rows first,
    then the rejected rows in the same order), and the longest of them."""
    b = len(row_lengths) // 2
    rows = [*pairs, *(b + i for i in pairs)]
    return rows, max(row_lengths[r] for r in rows)


def collate(pairs: list[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int = 1,
            pad_length: Callable[[int], int] | None = None, ref: RefTable | None = None) -> Batch:
    """Right-pad the chosen and rejected sequences of ``pairs`` into one Batch.

    The width is the longest row, or ``pad_length(longest)`` when given (a backend's buckets,
    see ``Backend.padded_length``), rounded up to ``pad_to_multiple_of`` (steadier shapes for
    compiled or tensor-core kernels). With ``ref``, the batch carries the pairs' precomputed
    reference log-probs.
    """
    if not pairs:
        raise ValueError("collate needs at least one pair")
    rows = ([(*p.prompt_ids, *p.chosen_ids) for p in pairs]
            + [(*p.prompt_ids, *p.rejected_ids) for p in pairs])
    prompt_lengths = [len(p.prompt_ids) for p in pairs] * 2
    input_ids, real, positions = _padded(rows, pad_token_id, pad_to_multiple_of, pad_length)
    completion = real & (positions >= torch.tensor(prompt_lengths)[:, None])
    return Batch(input_ids, real.long(), completion,
                 ref_logps=None if ref is None else ref.lookup(pairs),
                 row_lengths=tuple(map(len, rows)), prompt_lengths=tuple(prompt_lengths),
                 completion_tokens=sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs))


def collate_examples(examples: list[TokenizedExample], pad_token_id: int,
                     pad_to_multiple_of: int = 1,
                     pad_length: Callable[[int], int] | None = None) -> Batch:
    """Right-pad ``examples`` into one Batch of one row each, for supervised fine-tuning.

    Padded as by ``collate``. ``completion_mask`` is True exactly on the trained tokens (after
    the prompt, outside the untrained spans). ``prompt_lengths`` are the examples' prompt
    lengths when every trained token of every row follows its prompt, else () (an example with
    untrained spans), which keeps such a batch off the paths that score a row's whole suffix
    (``dpo.core.model.logps.rows_logps``). No reference log-probs.
    """
    if not examples:
        raise ValueError("collate_examples needs at least one example")
    rows = [e.ids for e in examples]
    input_ids, real, positions = _padded(rows, pad_token_id, pad_to_multiple_of, pad_length)
    prompt_lengths = [e.prompt_length for e in examples]
    trained = real & (positions >= torch.tensor(prompt_lengths)[:, None])
    for row, example in enumerate(examples):
        for start, end in example.untrained:
            trained[row, start:end] = False
    holes = any(e.untrained for e in examples)
    return Batch(input_ids, real.long(), trained, row_lengths=tuple(map(len, rows)),
                 prompt_lengths=() if holes else tuple(prompt_lengths),
                 completion_tokens=sum(e.trained_tokens for e in examples), paired=False)


def _padded(rows: list[tuple[int, ...]], pad_token_id: int, pad_to_multiple_of: int,
            pad_length: Callable[[int], int] | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [R, T] right-padded with ``pad_token_id``, real-token mask [R, T] bool, positions
    [T]): T is the longest row, or ``pad_length`` of it, rounded up to ``pad_to_multiple_of``."""
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [len(r) for r in rows]
    longest = max(lengths)
    width = pad_length(longest) if pad_length is not None else longest
    if width < longest:
        raise ValueError(f"pad_length({longest}) gave {width}, shorter than the longest row")
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.tensor([[*r, *(pad_token_id,) * (width - len(r))] for r in rows],
                             dtype=torch.long)
    positions = torch.arange(width)
    return input_ids, positions < torch.tensor(lengths)[:, None], positions


def bucket_length(length: int, minimum: int = 64, per_doubling: int = 4) -> int:
    """``length`` rounded up to a bucket width: ``minimum``, then multiples of ``minimum``
    until ``per_doubling`` of them span a doubling, then ``per_doubling`` evenly spaced widths
    per doubling. With the defaults: 64, 128, ..., 512 (every 64), 640, 768, 896, 1024, 1280, ...

    A compiling backend then sees few shapes, growing with the log of the length (8 widths up to
    512 tokens, 20 up to 4096, against 64 for plain multiples of 64), while a row gets fewer
    than ``max(minimum, length / per_doubling)`` padding tokens (powers of two would nearly
    double some rows).
    """
    if length < 1 or minimum < 1 or per_doubling < 1:
        raise ValueError(f"bucket_length needs positive arguments, got {length}, {minimum}, "
                         f"{per_doubling}")
    if length <= minimum:
        return minimum
    step = max(minimum, (1 << ((length - 1).bit_length() - 1)) // per_doubling)
    return -(-length // step) * step


class BatchSampler:
    """Which pairs go into which batch, for one rank, as a pure function of (seed, epoch).

    Nothing is stateful and the global RNG is never used, so a resumed run only needs the epoch
    and the position within it to see exactly the batches an uninterrupted run would.

    One epoch:
      1. A permutation from a ``torch.Generator`` seeded with ``seed + epoch`` (file order when
         ``shuffle`` is False).
      2. Making the count fit the ranks. Several ranks: the order is padded by repeating its
         first indices until the count divides ``world_size`` (at most ``world_size - 1``
         repeats, as torch's DistributedSampler does). ``drop_last``: the tail that would make a
         short step is dropped instead, so every batch is full.
      3. Length grouping: within mega-chunks of ``mega_batches`` steps, indices are sorted by
         length, longest first, so a step holds similar lengths and little padding; then the
         order of steps is shuffled with the same generator so lengths do not trend over the epoch.
      4. Cut into steps of ``batch_size * world_size`` indices (the last may be shorter, but
         its size divides ``world_size``); rank r takes every ``world_size``-th index of each
         step from the r-th. Every rank gets the same number of batches, of the same sizes and
         of similar lengths, so no rank waits long for another.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, mega_batches: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if mega_batches < 1:
            raise ValueError(f"mega_batches must be >= 1, got {mega_batches}")
        self.lengths = list(lengths)
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.mega_batches = drop_last, mega_batches

    @property
    def step_size(self) -> int:
        """Indices consumed across all ranks per batch."""
        return self.batch_size * self.world_size

    def _count(self) -> int:
        """How many indices an epoch uses after padding or dropping."""
        n = len(self.lengths)
        if self.drop_last:
            return n - n % self.step_size
        return n + (-n) % self.world_size

    def __len__(self) -> int:
        return -(-self._count() // self.step_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """The index batches of ``epoch`` for this rank, in order."""
        return [step[self.rank::self.world_size] for step in self.steps(epoch)]

    def steps(self, epoch: int) -> list[list[int]]:
        """The indices of ``epoch``'s batches over all ranks, in order: rank r's batch is
        ``step[r::world_size]``. Every rank can compute them all, so what a step holds on the
        other ranks (its weight) is known without a collective."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        count = self._count()
        if count <= n:
            order = order[:count]
        else:
            order = (order * -(-count // n))[:count] if n else []
        if self.group_by_length:
            chunk = self.mega_batches * self.step_size
            order = [i for start in range(0, len(order), chunk)
                     for i in sorted(order[start:start + chunk], key=lambda i: -self.lengths[i])]
        steps = [order[i:i + self.step_size] for i in range(0, len(order), self.step_size)]
        if self.group_by_length and self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        return steps
