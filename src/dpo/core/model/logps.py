"""Per-sequence summed log-probabilities of completion tokens: the hot path of every step."""

from __future__ import annotations



import torch
import torch.nn.functional as F

from dpo.core.data.batching import Batch, pair_rows
from dpo.core.model.paths import Paths, plain_tied_embedding, verified_paths


# transformers renamed ``past_key_values`` to ``cache`` (5.24); either is accepted here.
_CACHE_ARG = "past_key_values"
try:
    from transformers.modeling_outputs import BaseModelOutputWithPast as _Output

    if "cache" in getattr(_Output, "__dataclass_fields__", {}):
        _CACHE_ARG = "cache"
except ImportError:  # pragma: no cover
    pass

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover
    DynamicCache = object  # type: ignore[assignment,misc]

def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    paths: Paths | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the completion tokens of each row, in float32.

    Args:
        input_ids: [N, T] token ids, right-padded (every row's real tokens first).
        attention_mask: [N, T], 1 for real tokens.
        completion_mask: [N, T] bool, True where token t belongs to the completion (its
            probability is read from the logits at t - 1). The prompt and padding are False.
        paths: the speed paths to take (``dpo.core.model.paths``); None: every one verified for
            this model.

    Returns:
        (logps [N] float32, token_counts [N] int64).

    The plain path (every speed path off) runs each row alone through the model's own
    forward, full logits and log-softmax; ``batched`` runs the rows together, right-padded,
    with the attention mask. With ``unmasked`` they run without the mask: under causal
    attention a real token only sees the tokens before it, all real, so padding after the row
    cannot change it, and the padding's own outputs are never read. The attention kernel then
    runs its causal path (flash attention where the backend has one) instead of building and
    applying an [N, 1, T, T] mask: measured 3x faster forward + backward and less memory on
    CPU (``benchmarks/techniques.py``).

    With ``chunked_head`` only the positions that predict a completion token go through the
    output projection, so prompt and padding positions never materialise vocabulary-sized
    logits, and those that do go through it in chunks (``head_logps``): at most
    ``CHUNK_ROWS`` rows of logits exist at a time, in forward and in backward. That selection
    has a data-dependent size; with ``static_shapes`` (XLA, see ``Backend.static_shapes``)
    every position is scored and the mask zeroes the others instead, so shapes follow the
    batch's.
    """
    paths = verified_paths(model) if paths is None else paths
    if paths.static_shapes:
        return _masked_completion_logps(model, input_ids, attention_mask, completion_mask)
    if not paths.batched and input_ids.shape[0] > 1:
        return _row_by_row(model, input_ids, attention_mask, completion_mask, paths)
    targets_mask = completion_mask[:, 1:]
    targets = input_ids[:, 1:][targets_mask]  # [M]
    rows = torch.nonzero(targets_mask, as_tuple=True)[0]  # [M] row of each target
    mask = {} if paths.unmasked else {"attention_mask": attention_mask}
    if not paths.chunked_head:
        logits = model(input_ids=input_ids, use_cache=False, **mask).logits
        token_logps = -F.cross_entropy(logits[:, :-1][targets_mask].float(), targets,
                                       reduction="none")  # [M]
    else:
        head, decoder = model.get_output_embeddings(), model.get_decoder()
        tied = TiedGradient.of(model) if paths.tied_buffer else None
        hidden = decoder(**_tokens(model, input_ids, paths, tied), use_cache=False, **mask)
        hidden = hidden.last_hidden_state[:, :-1][targets_mask]  # [M, H]
        token_logps = head_logps(hidden, head.weight, head.bias, targets, tied=tied)
    n = input_ids.shape[0]
    logps = torch.zeros(n, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)
    counts = targets_mask.sum(dim=1)
    return logps, counts


def _row_by_row(model, input_ids, attention_mask, completion_mask, paths):
    """``completion_logps`` of each row alone, cut to its real tokens: no padding and no other
    row beside it, for models whose batched forward is not proven to ignore both."""
    logps, counts = [], []
    for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
        value, count = completion_logps(model, input_ids[row:row + 1, :length],
                                        attention_mask[row:row + 1, :length],
                                        completion_mask[row:row + 1, :length], paths)
        logps.append(value)
        counts.append(count)
    return torch.cat(logps), torch.cat(counts)


def shared_prompt_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                       prompt_lengths: tuple[int, ...], row_lengths: tuple[int, ...],
                       paths: Paths | None = None, tied: TiedGradient | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logps`` of a batch of pairs (rows 0..B-1 chosen, B..2B-1 rejected, right
    padded) with each pair's prompt run once instead of twice.

    1. The B prompts run as one [B, P_max] batch, right-padded, without a mask (causal: a
       prompt token cannot see what follows it), keeping their keys and values.
    2. The 2B completions run as one [2B, C_max] batch on those keys and values (each pair's
       repeated for its two completions), with a mask that hides the prompt padding and
       position ids that continue each prompt (P_i, P_i + 1, ...), so every completion token
       sees exactly its prompt and the completion tokens before it.
    3. Completion token j is predicted by the prompt's last hidden state (j = 0) or the
       completion's own at j - 1, all through the output projection together (``head_logps``).

    The same function as over prompt + completion rows, computed on B P_max + 2B C_max tokens
    instead of 2B (P + C)_max; the gradient reaches each prompt through its keys and values
    from both completions. ``prompt_lengths[r]`` and ``row_lengths[r]`` (host ints) are row
    r's prompt length and real length; a pair's two rows share the prompt. ``paths``: the
    speed paths (``tied_buffer`` among them; None: every one verified for the model), of which
    the caller has checked ``shared_prompt``. ``tied``: the ``TiedGradient`` of the batch
    these rows belong to (one of its own by default).

    Completion token j of a pair whose prompt is shorter than the group's longest sits at
    cache index ``P_max + j``, not at its position ``P_i + j``: the same masks wherever
    attention depends on positions and the mask, and on cache indices only within a window
    (sliding, local or chunked attention) that covers the whole group
    (``shared_prompt_plan``'s ``window``).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    paths = verified_paths(model) if paths is None else paths
    if tied is None and paths.tied_buffer:
        tied = TiedGradient.of(model)
    device = input_ids.device
    n, width = input_ids.shape
    b = n // 2
    prompts = prompt_lengths[:b]
    completions = [row_lengths[r] - prompt_lengths[r] for r in range(n)]
    p_max, c_max = max(prompts), max(completions)
    # Rows interleaved as (pair 0 chosen, pair 0 rejected, pair 1 chosen, ...), the order of
    # the repeated keys and values.
    order = [r for i in range(b) for r in (i, b + i)]
    start = torch.tensor([prompts[r % b] for r in order], device=device)[:, None]  # [2B, 1]
    steps = torch.arange(c_max, device=device)[None]
    tokens = input_ids[order].gather(1, (start + steps).clamp(max=width - 1))  # [2B, C_max]

    prompt_cache = PromptCache()
    prompt = decoder(**_tokens(model, input_ids[:b, :p_max], paths, tied), use_cache=True,
                     **{_CACHE_ARG: prompt_cache})
    seen = torch.cat([torch.arange(p_max, device=device)[None] < start,
                      torch.ones(2 * b, c_max, dtype=torch.bool, device=device)], dim=1)
    out = decoder(**_tokens(model, tokens, paths, tied), attention_mask=seen.long(),
                  position_ids=start + steps, use_cache=True,
                  **{_CACHE_ARG: PrefixCache(prompt_cache, repeats=2)})
    last = prompt.last_hidden_state[torch.arange(b, device=device), torch.tensor(prompts, device=device) - 1]
    hidden = torch.cat([last.repeat_interleave(2, dim=0)[:, None],
                        out.last_hidden_state[:, :-1]], dim=1)  # [2B, C_max, H]
    lengths = torch.tensor([completions[r] for r in order], device=device)[:, None]
    valid = steps < lengths  # [2B, C_max]
    token_logps = head_logps(hidden[valid], head.weight, head.bias, tokens[valid], tied=tied)
    rows = torch.tensor(order, device=device)[:, None].expand(-1, c_max)[valid]
    logps = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, rows, token_logps)
    counts = torch.tensor(completions, device=device)
    return logps, counts


class PromptCache(DynamicCache):
    """The prompts' keys and values, as ``shared_prompt_logps`` keeps them for the completions.

    A checkpointed layer (``dpo.core.model.activations``) calls ``update`` twice: in forward, then
    again when backward replays it, and the replay must compute what the first call did. The
    first call stores the keys and values and returns them (the cache was empty); a replay finds
    the layer filled and returns its input as it is, storing nothing.
    """

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < len(self.layers) and getattr(self.layers[layer_idx], "is_initialized", False):
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class PrefixCache(DynamicCache):
    """A read-only view of a ``PromptCache`` for the completions: each layer's ``update``
    returns the prompts' keys and values (each repeated ``repeats`` times along the batch, one
    per completion of the pair) followed by the new ones, and stores nothing. So a replay gets
    the same, and none of the completions' keys and values outlive the call (with
    checkpointing, they are rebuilt in backward)."""

    def __init__(self, prompts: PromptCache, repeats: int) -> None:
        super().__init__()
        self.layers = list(prompts.layers)  # sequence length and mask sizes are the prompts'
        self.layer_class_to_replicate = None
        self.repeats = repeats

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return (torch.cat([layer.keys.repeat_interleave(self.repeats, dim=0), key_states], dim=-2),
                torch.cat([layer.values.repeat_interleave(self.repeats, dim=0), value_states],
                          dim=-2))


# What one more pair of forward calls costs, in tokens: each call streams every weight through
# the cores again, and smaller matrix products run less efficiently. Fitted on this project's
# CPU measurements (a batch of 4 HH-RLHF pairs one at a time against all four together).
GROUP_COST_TOKENS = 192


def shared_prompt_plan(prompt_lengths: tuple[int, ...], row_lengths: tuple[int, ...],
                       window: int | None = None) -> tuple[list[list[int]], int]:
    """How ``rows_logps`` splits a batch of pairs for ``shared_prompt_logps``: groups of pair
    indices, and the tokens they run (each group: its prompts padded to the longest, then its
    completions padded to the longest).

    Pairs are ordered by length and cut into consecutive groups by dynamic programming over
    the cut points, minimising tokens plus ``GROUP_COST_TOKENS`` per group: similar pairs run
    together, and a pair unlike the others (a long completion among short ones) runs apart
    instead of padding the rest to its length. Depends on the lengths (and ``window``) alone.

    ``window``: the model's smallest attention window (``Paths.window``). A group whose
    prompts differ in length puts completions at cache indices past their positions, which a
    window counted in cache indices would see differently; so such a group must fit its
    longest prompt and longest completion within the window, where nothing is ever hidden by
    it. A pair alone, or pairs with equal prompts, have cache indices equal to positions.
    """
    b = len(row_lengths) // 2
    prompts = prompt_lengths[:b]
    longest = [max(row_lengths[i], row_lengths[b + i]) - prompts[i] for i in range(b)]
    order = sorted(range(b), key=lambda i: (prompts[i] + longest[i], prompts[i], i))
    best = [0] + [None] * b  # best[j]: cost of the first j pairs of ``order``
    cut = [0] * (b + 1)
    for j in range(1, b + 1):
        for i in range(j):
            group = order[i:j]
            if window is not None and not _fits_window(group, prompts, longest, window):
                continue
            cost = (best[i] + len(group) * (max(prompts[k] for k in group)
                                            + 2 * max(longest[k] for k in group))
                    + GROUP_COST_TOKENS)
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], b
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    groups.reverse()
    return groups, best[b] - GROUP_COST_TOKENS * len(groups)


def _fits_window(group: list[int], prompts: tuple[int, ...], longest: list[int],
                 window: int) -> bool:
    """Whether ``group``'s completions see through the window what they would in their own
    rows: its prompts are all equal, or its widest cache (longest prompt + longest
    completion) is within the window."""
    if len({prompts[k] for k in group}) == 1:
        return True
    return max(prompts[k] for k in group) + max(longest[k] for k in group) <= window


def _shared_plan_if_cheaper(input_ids: torch.Tensor, prompt_lengths: tuple[int, ...],
                            row_lengths: tuple[int, ...], window: int | None = None
                            ) -> tuple[list[list[int]], int] | None:
    """``shared_prompt_plan`` when it costs less than the padded rows (one group of calls),
    else None."""
    groups, tokens = shared_prompt_plan(prompt_lengths, row_lengths, window)
    if tokens + GROUP_COST_TOKENS * len(groups) < input_ids.numel() + GROUP_COST_TOKENS:
        return groups, tokens
    return None


def tokens_run(batch: Batch, paths: Paths) -> int:
    """Tokens ``batch_logps`` runs for ``batch`` on ``paths``, padding included."""
    input_ids, prompt_lengths, row_lengths = batch.input_ids, batch.prompt_lengths, batch.row_lengths
    if batch.paired and paths.shared_prompt and prompt_lengths:
        plan = _shared_plan_if_cheaper(input_ids, prompt_lengths, row_lengths, paths.window)
        if plan is not None:
            return plan[1]
    if paths.packed_rows and prompt_lengths and row_lengths:
        return sum(row_lengths)
    return input_ids.numel()


def packed_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                 prompt_lengths: tuple[int, ...], row_lengths: tuple[int, ...],
                 paths: Paths | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logps`` of right-padded rows run without their padding: the rows' real
    tokens concatenated into one sequence [1, sum of lengths], position ids restarting at 0
    for each row, and the rows' boundaries given to the attention as cumulative lengths
    (``cu_seq_lens_q/k``, ``max_length_q/k``: the variable-length form flash-attention
    kernels take, computed here on the host so that the kernel needs no device read).
    Attention implementations without such a kernel get, from transformers, a block-diagonal
    causal mask built from the restarting positions: the same function, at the cost of
    attention over the whole concatenation, so ``rows_logps`` packs only where the kernel
    exists (``Paths.packed_rows``).

    Completion token t of row r (``prompt_lengths[r] <= t < row_lengths[r]``, t >= 1) is
    predicted at the packed position of t - 1: the same positions and targets as the padded
    rows, through the same chunked projection (``head_logps``).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = input_ids.device
    n, width = input_ids.shape
    starts = [0]
    for length in row_lengths:
        starts.append(starts[-1] + length)
    take = [r * width + t for r in range(n) for t in range(row_lengths[r])]
    ids = input_ids.reshape(-1)[torch.tensor(take, device=device)][None]  # [1, total]
    positions = torch.tensor([t for r in range(n) for t in range(row_lengths[r])],
                             device=device)[None]
    cumulative = torch.tensor(starts, dtype=torch.int32, device=device)
    longest = max(row_lengths)
    paths = verified_paths(model) if paths is None else paths
    tied = TiedGradient.of(model) if paths.tied_buffer else None
    out = decoder(**_tokens(model, ids, paths, tied), position_ids=positions, use_cache=False,
                  cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative,
                  max_length_q=longest, max_length_k=longest)
    first = [max(prompt_lengths[r], 1) for r in range(n)]
    targets = [(r, starts[r] + t) for r in range(n) for t in range(first[r], row_lengths[r])]
    at = torch.tensor([i for _, i in targets], device=device)
    token_logps = head_logps(out.last_hidden_state[0, at - 1], head.weight, head.bias, ids[0, at],
                             tied=tied)
    rows = torch.tensor([r for r, _ in targets], device=device)
    logps = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, rows, token_logps)
    counts = torch.tensor([row_lengths[r] - first[r] for r in range(n)], device=device)
    return logps, counts


def rows_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               completion_mask: torch.Tensor, prompt_lengths: tuple[int, ...] = (),
               row_lengths: tuple[int, ...] = (), paths: Paths | None = None, *,
               paired: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps [R], counts [R]) of a batch's rows on ``paths`` (None: every path verified for
    the model): for a batch of pairs (``paired``: 2B rows, each pair's chosen and rejected
    rows sharing its prompt) with ``shared_prompt``, ``shared_prompt_logps`` over the groups
    of ``shared_prompt_plan`` when they run fewer tokens than the padded rows; else with
    ``packed_rows`` and the rows' prompt and real lengths, the rows packed without padding
    (``packed_logps``); else ``completion_logps``, which reads the completion mask (and so
    serves rows whose trained tokens have holes, given without ``prompt_lengths``). Every path
    computes the same function, and the choice depends on the lengths and the paths alone, so a
    batch is always scored the same way."""
    paths = verified_paths(model) if paths is None else paths
    if paired and paths.shared_prompt and prompt_lengths:
        plan = _shared_plan_if_cheaper(input_ids, prompt_lengths, row_lengths, paths.window)
        if plan is not None:
            return _grouped_shared_logps(model, input_ids, prompt_lengths, row_lengths, plan[0],
                                         paths)
    if paths.packed_rows and prompt_lengths and row_lengths:
        return packed_logps(model, input_ids, prompt_lengths, row_lengths, paths)
    return completion_logps(model, input_ids, attention_mask, completion_mask, paths)


def backward_parts(batch: Batch, paths: Paths) -> list[Batch]:
    """The parts of a training batch that can run forward and backward one after the other:
    the shared prompt's groups, when ``rows_logps`` would run the batch in several. Each group
    already has forward calls of its own, and per-pair losses make the batch's gradient the sum
    of its groups', so running each group's backward before the next group's forward leaves one
    group's activations alive at a time instead of all of them, for the same computation (each
    part is scored by the very calls ``rows_logps`` makes for its group). Otherwise [batch]."""
    if batch.paired and paths.shared_prompt and batch.prompt_lengths:
        plan = _shared_plan_if_cheaper(batch.input_ids, batch.prompt_lengths, batch.row_lengths,
                                       paths.window)
        if plan is not None and len(plan[0]) > 1:
            return [batch.select(group) for group in plan[0]]
    return [batch]


def _grouped_shared_logps(model, input_ids, prompt_lengths, row_lengths, groups, paths):
    if len(groups) == 1:
        return shared_prompt_logps(model, input_ids, prompt_lengths, row_lengths, paths)
    parts, counts, index = [], [], []
    # one gradient buffer for all the groups
    tied = TiedGradient.of(model) if paths.tied_buffer else None
    for group in groups:
        rows, width = pair_rows(group, row_lengths)  # as ``Batch.select`` takes a group
        logps, n = shared_prompt_logps(model, input_ids[rows, :width],
                                       tuple(prompt_lengths[r] for r in rows),
                                       tuple(row_lengths[r] for r in rows), paths, tied)
        parts.append(logps)
        counts.append(n)
        index += rows
    where = torch.tensor(index, device=input_ids.device)
    logps = torch.zeros(len(index), dtype=torch.float32, device=input_ids.device)
    return (logps.index_add(0, where, torch.cat(parts)),
            torch.zeros_like(where).index_add(0, where, torch.cat(counts)))


def batch_logps(model: torch.nn.Module, batch: Batch, paths: Paths | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows_logps`` of a ``Batch`` (of pairs or of examples)."""
    return rows_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                      batch.prompt_lengths, batch.row_lengths, paths, paired=batch.paired)


class TiedGradient:
    """The gradient of an input embedding that is also the output projection (tied weights,
    as in SmolLM2 or Llama 3.2), built in one float32 buffer by all its uses in one batch's
    forward: the projection's backward (``head_logps``) adds its product there, each token
    lookup (``lookup``) its rows, and the last lookup to run in backward hands the buffer to
    autograd as the weight's only gradient.

    Left to autograd, each use gives a [V, H] gradient of its own, and a lookup's is a
    zero-filled [V, H] with a few rows set (``embedding_dense_backward``), added to the others
    at the end of backward, when every other gradient exists too: on SmolLM2-135M, 108 MiB
    on top of the step's peak, and a [V, H] zero fill and sum per decoder call.

    Every projection's backward runs before the last lookup's: a lookup's output feeds the
    decoder call whose output feeds a projection, so a projection runs before its own
    batch's lookups, and the last lookup runs after all of them. Each lookup's output must
    reach the loss (so its backward runs): every decoder call here feeds the log-probs.
    """

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self._buffer: torch.Tensor | None = None
        self._pending = 0  # lookups whose backward has yet to run

    @staticmethod
    def applies(model: torch.nn.Module) -> bool:
        """Whether the input embedding is a plain ``nn.Embedding`` sharing its weight with a
        linear output projection (``dpo.core.model.paths.plain_tied_embedding``)."""
        return plain_tied_embedding(model)

    @classmethod
    def of(cls, model: torch.nn.Module) -> TiedGradient | None:
        """One for a forward of ``model`` that will run backward, where ``applies``; else None
        (autograd sums the uses' gradients as usual)."""
        if (not cls.applies(model) or not torch.is_grad_enabled()
                or not model.get_input_embeddings().weight.requires_grad):
            return None
        return cls(model.get_input_embeddings())

    def buffer(self) -> torch.Tensor:
        """The float32 gradient buffer, zeros when first asked for."""
        if self._buffer is None:
            self._buffer = torch.zeros(self.weight.shape, dtype=torch.float32,
                                       device=self.weight.device)
        return self._buffer

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``embedding(input_ids)``, whose backward adds into the buffer."""
        self._pending += 1
        return _TiedLookup.apply(input_ids, self.weight, self)

    def _add_rows(self, input_ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        ids = input_ids.reshape(-1)
        grad = grad.reshape(ids.shape[0], -1)
        if self.padding_idx is not None:  # nn.Embedding leaves the padding row's gradient 0
            grad = grad.masked_fill((ids == self.padding_idx)[:, None], 0)
        # index_put_ with accumulate: CUDA sorts the ids and sums each row's updates in order,
        # where index_add_ would add them atomically, in no fixed order.
        self.buffer().index_put_((ids,), grad.to(torch.float32), accumulate=True)
        self._pending -= 1
        if self._pending:
            return None
        done, self._buffer = self._buffer, None
        return done.to(self.weight.dtype)


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, tied):
        ctx.save_for_backward(input_ids)
        ctx.tied = tied
        return F.embedding(input_ids, weight, tied.padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (input_ids,) = ctx.saved_tensors
        return None, ctx.tied._add_rows(input_ids, grad), None


def _tokens(model: torch.nn.Module, input_ids: torch.Tensor, paths: Paths,
            tied: TiedGradient | None) -> dict[str, torch.Tensor]:
    """A decoder call's token argument: the ids, or on the ``tied_buffer`` path their
    embeddings (through ``tied``'s lookup where a backward will run; the same values either
    way, so scoring without a gradient takes the very path training does)."""
    if not paths.tied_buffer:
        return {"input_ids": input_ids}
    if tied is not None:
        return {"inputs_embeds": tied.lookup(input_ids)}
    embedding = model.get_input_embeddings()
    return {"inputs_embeds": F.embedding(input_ids, embedding.weight, embedding.padding_idx)}


# Rows of logits alive at once in ``head_logps``: 1024 x a 50k vocabulary is 200 MB in float32.
CHUNK_ROWS = 1024


def head_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS,
               tied: TiedGradient | None = None) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T + bias)[m, targets[m]]`` for each row m, in float32,
    without ever holding the [M, V] logits or their gradient: rows go through the projection
    ``chunk_rows`` at a time, and backward recomputes each chunk's logits instead of keeping
    them. Memory beyond the inputs is one chunk's logits; the cost is one more [chunk, H] x
    [H, V] product per chunk in backward (the projection's forward, run twice).

    The gradient of log p(y | h) with respect to the logits z is onehot(y) - softmax(z), so
    with g the incoming gradient of each row: dz = g (onehot - p), dh = dz W, dW = dz^T h,
    db = sum over rows of dz.

    Under autocast the product runs in the autocast dtype (as ``nn.Linear`` would), the
    log-softmax in float32. With ``tied`` (``weight`` is also the input embedding), the
    weight's gradient goes into ``tied``'s buffer instead of to autograd.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _HeadLogps.apply(hidden, weight, bias, targets, chunk_rows, tied)


def _exp_shifted_(z: torch.Tensor) -> torch.Tensor:
    """Overwrite the [rows, V] logits ``z`` with ``exp(z - max z)`` row by row and return each
    row's ``max z`` [rows, 1]: softmax and log-sum-exp follow from it without the [rows, V]
    temporary that ``torch.logsumexp`` or ``torch.softmax`` allocates beside ``z``."""
    shift = z.amax(dim=1, keepdim=True)
    z.sub_(shift).exp_()
    return shift


def _compute_dtype(tensor: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(tensor.dtype, weight.dtype)


class _HeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, tied=None):
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)
                z = F.linear(h, w, b).float()
                y = targets[start:start + chunk_rows]
                picked = z.gather(1, y[:, None]).squeeze(1)
                shift = _exp_shifted_(z)  # one [chunk, V] buffer: log-sum-exp in place
                out[start:start + chunk_rows] = picked - (z.sum(dim=1).log_() + shift[:, 0])
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_rows, ctx.dtype, ctx.tied = chunk_rows, dtype, tied
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk_rows, dtype, tied = ctx.chunk_rows, ctx.dtype, ctx.tied
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight's gradient is accumulated chunk by chunk into one float32 buffer (the
        # tied embedding's, where there is one): no [V, H] product is made apart from it.
        if not need_w:
            grad_w = None
        elif tied is not None:
            grad_w = tied.buffer()
        else:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if need_b and bias is not None else None)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)
                y = targets[start:start + chunk_rows]
                g = grad_out[start:start + chunk_rows].float()
                # dz = g * (onehot(y) - softmax(z)), built in place on the chunk's logits:
                # softmax(z) = exp(z - max z) / sum exp(z - max z), so one [chunk, V] buffer is
                # all it takes.
                dz = F.linear(h, w, b).float()
                _exp_shifted_(dz)
                dz.mul_((-g / dz.sum(dim=1))[:, None])
                dz.scatter_add_(1, y[:, None], g[:, None])
                if grad_h is not None:
                    grad_h[start:start + chunk_rows] = (dz.to(dtype) @ w).to(hidden.dtype)
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h)
                elif grad_w is not None:  # accumulated in float32 whatever the product's dtype
                    grad_w.add_(dz.to(dtype).t() @ h)
                if grad_b is not None:
                    grad_b.add_(dz.sum(0))
        if tied is not None:
            grad_w = None  # in the buffer: the last lookup's backward hands it to autograd
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def _masked_completion_logps(model, input_ids, attention_mask, completion_mask):
    """``completion_logps`` without value-dependent shapes: [N, T-1, V] logits, masked sum."""
    targets_mask = completion_mask[:, 1:]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                   reduction="none")  # [N, T-1]
    # where, not a product: a padding position's score must not leak in, even as nan * 0.
    logps = torch.where(targets_mask, token_logps, 0.0).sum(dim=1)
    return logps, targets_mask.sum(dim=1)


def reference_completion_logps(model, input_ids, attention_mask, completion_mask, paths=None):
    """``completion_logps`` under ``torch.no_grad`` for a frozen reference model."""
    with torch.no_grad():
        return completion_logps(model, input_ids, attention_mask, completion_mask, paths)
