"""Completion log-probabilities: the selective path equals the plain full-logits computation."""

from __future__ import annotations

import pytest
import torch

from dpo.core.model.logps import completion_logps, tokens_run
from dpo.core.model.paths import Paths

# The speed paths as the tiny Llama takes them (its embedding is tied: the gradient buffer too).
PADDED = Paths(batched=True, unmasked=True, chunked_head=True, tied_buffer=True)
SHARED = Paths(batched=True, unmasked=True, chunked_head=True, tied_buffer=True, shared_prompt=True)
PACKED = Paths(batched=True, unmasked=True, chunked_head=True, tied_buffer=True, packed_rows=True)


def on(share: bool) -> Paths:
    return SHARED if share else PADDED


def plain_logps(model, input_ids, attention_mask, completion_mask):
    """The textbook computation: full logits, log-softmax, gather, mask, sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:]
    return (token * mask).sum(-1), mask.sum(-1)


def with_grads(model, logps_fn, *args, **kwargs):
    """(logps, counts, every parameter's gradient of logps.sum()); gradients cleared after."""
    model.zero_grad()
    logps, counts = logps_fn(model, *args, **kwargs)
    logps.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return logps, counts, grads


def assert_all_close(got, want, rtol, atol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def padded_batch():
    """Two rows, right-padded with id 0: row 0 has 3 prompt + 4 completion tokens (7 real),
    row 1 has 2 prompt + 2 completion tokens (4 real, 3 pads)."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    attention_mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    return input_ids, attention_mask, completion_mask


def test_selective_path_matches_plain_values_counts_and_gradients(tiny_model):
    batch = padded_batch()
    logps, counts, grads = with_grads(tiny_model, completion_logps, *batch)
    expected, expected_counts, expected_grads = with_grads(tiny_model, plain_logps, *batch)
    assert counts.tolist() == [4, 2] == expected_counts.tolist()
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
    assert logps.dtype == torch.float32 and (logps < 0).all()


def test_padding_does_not_change_a_row(tiny_model):
    """Row 1 alone, unpadded, must give the same log-prob as inside the padded batch."""
    input_ids, attention_mask, completion_mask = padded_batch()
    together, _ = completion_logps(tiny_model, input_ids, attention_mask, completion_mask)
    alone, _ = completion_logps(tiny_model, input_ids[1:, :4], attention_mask[1:, :4],
                                completion_mask[1:, :4])
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-5)


def test_on_replay_is_called_before_each_layer_runs_again_in_backward(tiny_model):
    """``checkpoint_layers(model, on_replay=f)`` calls f once per layer replay and never in
    forward or without a backward: 0 calls after the forward, one per layer after backward
    on padded rows (one decoder call), two per layer with the shared prompt (prompts, then
    completions: two calls of each layer, each replayed), 0 under ``torch.no_grad``."""
    import copy

    from dpo.core.model.activations import checkpoint_layers
    from dpo.core.model.logps import batch_logps

    _, batch = pair_batch()
    model = copy.deepcopy(tiny_model)
    calls = []
    assert checkpoint_layers(model, on_replay=lambda: calls.append(1))
    n_layers = len(model.get_decoder().layers)
    for share, per_layer in ((False, 1), (True, 2)):
        calls.clear()
        logps, _ = batch_logps(model, batch, paths=on(share))
        assert calls == []
        logps.sum().backward()
        assert len(calls) == per_layer * n_layers
    calls.clear()
    with torch.no_grad():
        batch_logps(model, batch, paths=SHARED)
    assert calls == []


# -- chunked output projection -----------------------------------------------------------------

def test_head_logps_matches_full_logits_across_chunk_boundaries():
    """7 rows in chunks of 3 (3 + 3 + 1): values and the gradients of hidden, weight and bias
    equal those of log_softmax over the full [7, V] logits, for any incoming gradient g
    (random here, so rows are weighted differently and a chunk mix-up would show)."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    g = torch.randn(7, dtype=torch.float64)

    from dpo.core.model.logps import head_logps

    got = head_logps(hidden, weight, bias, targets, chunk_rows=3)
    (got * g).sum().backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    full = torch.log_softmax(hidden @ weight.T + bias, dim=-1).gather(1, targets[:, None])[:, 0]
    (full * g).sum().backward()
    torch.testing.assert_close(got, full.float(), rtol=1e-6, atol=1e-6)
    for mine, want in zip(grads, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(mine, want, rtol=1e-6, atol=1e-6)


def test_head_logps_is_stable_where_exp_of_the_logits_overflows():
    """Logits near +-3000 (hidden states 100x larger than usual): exp of them is inf in
    float32, so log-sum-exp and softmax must subtract each row's maximum first. Values and
    gradients stay finite and equal those of float64 log_softmax over the full logits."""
    torch.manual_seed(1)
    hidden = (torch.randn(5, 16) * 100).requires_grad_()
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (5,))
    g = torch.randn(5)

    from dpo.core.model.logps import head_logps

    got = head_logps(hidden, weight, None, targets, chunk_rows=2)
    (got * g).sum().backward()
    grads = [hidden.grad.clone(), weight.grad.clone()]
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.T
    assert torch.isinf(logits.float().exp()).any()
    want = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    (want * g.double()).sum().backward()
    assert torch.isfinite(got).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grads[0], h64.grad.float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads[1], w64.grad.float(), rtol=1e-4, atol=1e-2)


def test_head_logps_under_bf16_autocast_matches_the_plain_projection():
    """Under bf16 autocast the chunked projection runs its products in bf16, as ``nn.Linear``
    would, and keeps log-softmax and the weight's gradient sum in float32: values and the
    gradients of hidden and weight equal those of the plain ``F.linear`` + float32
    log_softmax under the same autocast, to bf16's precision (8 bits of mantissa: 1e-2)."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 32, requires_grad=True)
    weight = (torch.randn(64, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 64, (9,))
    g = torch.randn(9)

    from dpo.core.model.logps import head_logps

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_logps(hidden, weight, None, targets, chunk_rows=4)
        full = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1)
        want = full.gather(1, targets[:, None])[:, 0]
    assert got.dtype == torch.float32
    (got * g).sum().backward()
    grads = [hidden.grad.clone(), weight.grad.clone()]
    assert grads[1].dtype == torch.float32
    hidden.grad = weight.grad = None
    (want * g).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    for mine, plain in zip(grads, (hidden.grad, weight.grad)):
        torch.testing.assert_close(mine, plain, rtol=2e-2, atol=2e-2)


def _allocations_in_backward(loss: torch.Tensor, nbytes: int) -> int:
    """How many allocations of ``nbytes`` exactly the backward of ``loss`` makes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage == nbytes)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_tied_embedding_gradient_is_one_buffer_and_autograd_s_sum(tiny_model, monkeypatch,
                                                                   share_prompt):
    """The tiny model's input embedding is its output projection. Its gradient (projection
    product + token rows, the padding row left 0 as ``nn.Embedding`` does) is built in one
    [V, H] buffer: a single allocation of that size in backward, where autograd's own sum of
    the uses makes one per use (padded rows: projection + lookup = 2; the shared prompt in
    two groups: 2 projections + 4 lookups, the groups' buffers alive together). Values are
    equal and every gradient equals autograd's sum, with the padding id among the tokens
    (padding and one real token: its row stays 0)."""
    import copy

    import dpo.core.model.logps as logps_module
    from dpo.core.data.batching import collate
    from dpo.core.model.logps import TiedGradient, batch_logps
    from dpo.core.data.tokenization import TokenizedPair

    model = copy.deepcopy(tiny_model)
    embedding = model.get_input_embeddings()
    pad = embedding.padding_idx
    assert pad is not None and model.get_output_embeddings().weight is embedding.weight
    # A pair apart (its long completion) makes the shared prompt run two groups.
    pairs = [TokenizedPair((5, 6, 7), (8, pad, 10), (12, 13)),
             TokenizedPair((14, 9), (15, 16), (17, 18, 19)),
             TokenizedPair((21, 22), (26,), tuple(range(30, 230)))]
    batch = collate(pairs, pad_token_id=pad)
    assert (batch.input_ids == pad).sum() > 1  # padding, and one real token
    nbytes = embedding.weight.numel() * embedding.weight.element_size()

    def run(tied: bool):
        model.zero_grad(set_to_none=True)
        if not tied:
            monkeypatch.setattr(TiedGradient, "of", classmethod(lambda cls, m: None))
        logps, counts = batch_logps(model, batch, paths=on(share_prompt))
        monkeypatch.undo()
        weights = torch.linspace(0.5, 1.5, logps.shape[0])  # rows weighted differently
        big = _allocations_in_backward((logps * weights).sum(), nbytes)
        return logps.detach(), big, [p.grad.clone() for p in model.parameters()]

    if share_prompt:
        plan = logps_module._shared_plan_if_cheaper(batch.input_ids, batch.prompt_lengths,
                                                    batch.row_lengths)
        assert plan is not None and len(plan[0]) == 2
    logps, big, grads = run(tied=True)
    want, autograd_big, want_grads = run(tied=False)
    torch.testing.assert_close(logps, want, rtol=0, atol=0)
    assert big == 1
    assert autograd_big == (6 if share_prompt else 2)
    assert_all_close(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_chunked_path_with_tied_embeddings_matches_plain(tiny_model, monkeypatch):
    """The tiny model's completion rows through the projection 2 at a time: log-probs and every
    parameter's gradient (the tied embedding gets both its input and output gradient) equal the
    full-logits computation."""
    import dpo.core.model.logps as logps_module

    monkeypatch.setattr(logps_module, "CHUNK_ROWS", 2)
    tiny_model.config.tie_word_embeddings = True
    tiny_model.tie_weights()
    assert tiny_model.get_output_embeddings().weight is tiny_model.get_input_embeddings().weight
    batch = padded_batch()
    logps, _, grads = with_grads(tiny_model, completion_logps, *batch)
    expected, _, expected_grads = with_grads(tiny_model, plain_logps, *batch)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_every_loss_is_unchanged_by_chunking(tiny_model, dpo_catalog, monkeypatch):
    """For each built-in loss (IPO's per-token normalisation included: it divides by the
    completion token counts), the loss and the policy's gradient through chunked log-probs
    (chunks of 1 row) equal those through full logits."""
    import dpo.core.model.logps as logps_module
    from dpo.core.interfaces.loss import PairLogps

    input_ids, attention_mask, completion_mask = padded_batch()
    # 2 pairs: rows 0/1 chosen, 2/3 rejected (rejected = the chosen rows with a changed token).
    rejected = input_ids.clone()
    rejected[0, 5], rejected[1, 3] = 20, 21
    batch = (torch.cat([input_ids, rejected]), torch.cat([attention_mask] * 2),
             torch.cat([completion_mask] * 2))
    reference = [v - 0.5 for v in plain_logps(tiny_model, *batch)[0].detach().chunk(2)]

    def run(logps_fn):
        tiny_model.zero_grad()
        logps, counts = logps_fn(tiny_model, *batch)
        out = loss(PairLogps(logps[:2], logps[2:], counts[:2], counts[2:], *reference))
        out.losses.sum().backward()
        return out.losses.detach(), [p.grad.clone() for p in tiny_model.parameters()]

    for name in ("dpo", "cdpo", "ipo"):
        loss = dpo_catalog.losses.get(name)(dpo_catalog.losses.get(name).parse_options({}))
        monkeypatch.setattr(logps_module, "CHUNK_ROWS", 1)
        chunked = run(completion_logps)
        plain = run(plain_logps)
        torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-6, msg=name)
        for got, want in zip(chunked[1], plain[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


# -- the prompt run once per pair --------------------------------------------------------------

def pair_batch():
    """Three pairs with different prompt lengths (3, 1, 5), the chosen completion longer in one,
    the rejected in another, equal in the third; right-padded to the longest row (9)."""
    from dpo.core.data.batching import collate
    from dpo.core.data.tokenization import TokenizedPair

    pairs = [TokenizedPair((5, 6, 7), (8, 9, 10, 11), (12, 13)),
             TokenizedPair((14,), (15, 16), (17, 18, 19, 20)),
             TokenizedPair((21, 22, 23, 24, 25), (26, 27, 28, 29), (30, 31, 32, 33))]
    return pairs, collate(pairs, pad_token_id=0)


def test_every_loss_is_unchanged_by_sharing_the_prompt(tiny_model, dpo_catalog):
    """dpo, cdpo and ipo (whose per-token normalisation reads the counts): the same losses and
    gradients through shared-prompt log-probs as through padded rows."""
    from dpo.core.model.logps import batch_logps
    from dpo.core.interfaces.loss import PairLogps

    _, batch = pair_batch()
    reference = [v - 0.25 for v in completion_logps(
        tiny_model, batch.input_ids, batch.attention_mask, batch.completion_mask)[0].detach().chunk(2)]

    def run(share: bool):
        tiny_model.zero_grad()
        logps, counts = batch_logps(tiny_model, batch, paths=on(share))
        out = loss(PairLogps(logps[:3], logps[3:], counts[:3], counts[3:], *reference))
        out.losses.sum().backward()
        return out.losses.detach(), [p.grad.clone() for p in tiny_model.parameters()]

    for name in ("dpo", "cdpo", "ipo"):
        loss = dpo_catalog.losses.get(name)(dpo_catalog.losses.get(name).parse_options({}))
        shared, padded = run(True), run(False)
        torch.testing.assert_close(shared[0], padded[0], rtol=1e-5, atol=1e-6, msg=name)
        for got, want in zip(shared[1], padded[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_that_costs_more_shared_runs_padded(tiny_model, monkeypatch):
    """One pair with a long prompt and short completions, another with a short prompt and a
    long completion (widths 10). Shared as one group: 2 x 8 prompt + 4 x 8 completion tokens =
    48 (+ 192 for the group's calls: 240); as two groups 12 + 18 = 30 tokens + 2 x 192 = 414;
    padded rows 4 x 10 = 40 + 192 = 232. So the padded rows run. The long-prompt pair alone
    shares (8 + 2 x 2 = 12 tokens against 2 x 10 = 20)."""
    import dpo.core.model.logps as logps_module
    from dpo.core.data.batching import collate
    from dpo.core.data.tokenization import TokenizedPair

    calls = []
    real = logps_module.shared_prompt_logps
    monkeypatch.setattr(logps_module, "shared_prompt_logps",
                        lambda *a: calls.append(1) or real(*a))
    long_prompt = TokenizedPair(tuple(range(5, 13)), (20, 21), (22, 23))
    long_completion = TokenizedPair((5, 6), tuple(range(30, 38)), (40, 41))
    mixed = collate([long_prompt, long_completion], pad_token_id=0)
    assert logps_module.shared_prompt_plan(mixed.prompt_lengths, mixed.row_lengths) == ([[0, 1]], 48)
    assert tokens_run(mixed, SHARED) == mixed.padded_tokens == 40
    logps_module.batch_logps(tiny_model, mixed, paths=SHARED)
    assert calls == []
    alone = collate([long_prompt], pad_token_id=0)
    assert tokens_run(alone, SHARED) == 12
    logps_module.batch_logps(tiny_model, alone, paths=SHARED)
    assert calls == [1]


def test_an_odd_pair_runs_apart_and_the_result_is_unchanged(tiny_model):
    """Three pairs of 4-token prompts and 2-token completions, and one of a 2-token prompt and
    a 300-token completion (in the middle of the batch). One group: 4 x 4 + 8 x 300 = 2416
    tokens; padded rows: 8 x 302 = 2416; apart: 3 x 4 + 6 x 2 = 24 and 2 + 2 x 300 = 602,
    626 tokens + 192 for the extra group. Values and gradients equal the padded rows'."""
    from dpo.core.data.batching import collate
    from dpo.core.model.logps import batch_logps, shared_prompt_plan
    from dpo.core.data.tokenization import TokenizedPair

    short = [TokenizedPair((5 + i, 6, 7, 8), (9, 10), (11, 12 + i)) for i in range(3)]
    odd = TokenizedPair((5, 6), tuple(range(20, 320)), (13, 14))
    batch = collate([short[0], odd, short[1], short[2]], pad_token_id=0)
    assert shared_prompt_plan(batch.prompt_lengths, batch.row_lengths) == ([[0, 2, 3], [1]], 626)
    assert tokens_run(batch, SHARED) == 626 and batch.padded_tokens == 2416

    shared, counts, grads = with_grads(tiny_model, batch_logps, batch, paths=SHARED)
    padded, padded_counts, want = with_grads(tiny_model, batch_logps, batch, paths=PADDED)
    assert counts.tolist() == padded_counts.tolist() == [2, 300, 2, 2, 2, 2, 2, 2]
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-4)
    assert_all_close(grads, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_checkpointed_layers_keep_values_and_gradients_on_both_paths(tiny_model, attention):
    """``--gradient-checkpointing`` (our per-layer wrapper) changes nothing computed: on padded
    rows and on the shared prompt (whose caches each layer updates twice, in forward and in
    the replay), log-probs, counts and every gradient equal the uncheckpointed ones. The replay
    happens: inside the layer, its MLP runs once in forward and once more in backward.

    Eager attention uses every key the cache returns (sdpa's causal path slices them to the
    query length), so there a replay that stored its keys again would attend to them twice."""
    import copy

    from dpo.core.model.activations import checkpoint_layers, is_checkpointed
    from dpo.core.model.logps import batch_logps

    _, batch = pair_batch()
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation(attention)
    checkpointed = copy.deepcopy(model)
    assert checkpoint_layers(checkpointed)
    layers = checkpointed.get_decoder().layers
    assert all(is_checkpointed(layer) for layer in layers)
    calls, inner = [], []
    hook = layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    inner_hook = layers[0].mlp.register_forward_pre_hook(lambda *_: inner.append(1))
    forward_calls, mlp_calls = {}, {}
    for share in (False, True):
        want = with_grads(model, batch_logps, batch, paths=on(share))
        calls.clear()
        inner.clear()
        got = with_grads(checkpointed, batch_logps, batch, paths=on(share))
        forward_calls[share], mlp_calls[share] = len(calls), len(inner)
        assert got[1].tolist() == want[1].tolist()
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        assert_all_close(got[2], want[2], rtol=1e-5, atol=1e-7)
    hook.remove()
    inner_hook.remove()
    # The layer's own hook sits on its call, outside the checkpoint: one per forward call
    # (padded rows: 1; shared prompt: prompts, then completions). Its MLP's runs in the replay.
    assert forward_calls == {False: 1, True: 2}
    assert mlp_calls == {False: 2, True: 4}
    with torch.no_grad():
        torch.testing.assert_close(batch_logps(checkpointed, batch, paths=SHARED)[0],
                                   batch_logps(model, batch, paths=SHARED)[0])


def test_backward_parts_are_the_groups_and_give_the_batch_gradient(tiny_model):
    """The odd-pair batch (groups [0, 2, 3] and [1]) splits into those two parts for training:
    each part's log-probs are bit for bit the whole batch's rows (the same calls), and the sum
    of the parts' gradients is the whole batch's gradient. A batch of one group, or without
    sharing, stays whole."""
    from dpo.core.data.batching import collate
    from dpo.core.model.logps import backward_parts, batch_logps
    from dpo.core.data.tokenization import TokenizedPair

    short = [TokenizedPair((5 + i, 6, 7, 8), (9, 10), (11, 12 + i)) for i in range(3)]
    odd = TokenizedPair((5, 6), tuple(range(20, 320)), (13, 14))
    batch = collate([short[0], odd, short[1], short[2]], pad_token_id=0)
    parts = backward_parts(batch, paths=SHARED)
    assert [p.num_pairs for p in parts] == [3, 1]
    assert parts[1].input_ids.shape == (2, 302) and parts[0].input_ids.shape == (6, 6)
    assert sum(tokens_run(p, SHARED) for p in parts) == tokens_run(batch, SHARED) == 626
    assert sum(p.completion_tokens for p in parts) == batch.completion_tokens

    whole, _, want = with_grads(tiny_model, batch_logps, batch, paths=SHARED)
    tiny_model.zero_grad()
    got = []
    for part in parts:
        logps, _ = batch_logps(tiny_model, part, paths=SHARED)
        logps.sum().backward()
        got.append(logps.detach())
    grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    # rows: part 0 is pairs 0, 2, 3 (chosen then rejected), part 1 is pair 1
    assert torch.equal(got[0], whole.detach()[[0, 2, 3, 4, 6, 7]])
    assert torch.equal(got[1], whole.detach()[[1, 5]])
    assert_all_close(grads, want, rtol=1e-5, atol=1e-7)

    [same] = backward_parts(batch, paths=PADDED)
    assert same is batch
    _, single = pair_batch()
    [same] = backward_parts(single, paths=SHARED)
    assert same is single


@pytest.mark.parametrize("layout, attention", [("shared", "sdpa"), ("packed", "sdpa"),
                                               ("packed", "eager")])
def test_shared_and_packed_rows_match_padded_rows_values_counts_and_gradients(tiny_model, layout,
                                                                             attention):
    """The same function as prompt + completion rows, padded: log-probs, counts and every
    gradient. ``shared``: each prompt run once, both completions on its keys and values.
    ``packed``: the rows' real tokens concatenated, positions restarting per row; with an
    attention that has no variable-length kernel, transformers masks the concatenation block
    by block from the restarting positions (so ``rows_logps`` would not pack this model)."""
    import copy

    from dpo.core.model.logps import packed_logps, shared_prompt_logps
    from dpo.core.model.paths import verified_paths

    _, batch = pair_batch()
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation(attention)
    assert not verified_paths(model).packed_rows
    logps_fn = shared_prompt_logps if layout == "shared" else packed_logps
    got, counts, grads = with_grads(model, logps_fn, batch.input_ids, batch.prompt_lengths,
                                    batch.row_lengths)
    padded, padded_counts, want = with_grads(model, completion_logps, batch.input_ids,
                                             batch.attention_mask, batch.completion_mask, PADDED)
    assert counts.tolist() == padded_counts.tolist() == [4, 2, 4, 2, 4, 4]
    torch.testing.assert_close(got, padded, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, want, rtol=1e-4, atol=1e-6)


def test_a_variable_length_kernel_gets_the_rows_boundaries_and_the_rows_run_packed(
        tiny_model, monkeypatch):
    """An attention with a variable-length kernel (here a stand-in that attends within each
    sequence from the cumulative lengths it is given, as flash-attention's variable-length
    kernel does, named in ``VARLEN_ATTENTION`` as flash-attention's names are) makes the
    run's paths (``dpo.core.model.paths.resolve``) pack the rows, the shared prompt being off by
    default off the CPU: every layer's kernel sees the rows' boundaries (cumulative
    real lengths, from the host) and the longest row, and the log-probs, counts and gradients
    equal the padded rows' under sdpa."""
    import copy

    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    import dpo.core.model.paths as paths_module
    from dpo.core.model.logps import batch_logps

    monkeypatch.setattr(paths_module, "VARLEN_ATTENTION", ["flash", "dpo_test_varlen"])
    seen = []

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
        cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
        seen.append((cu.tolist(), longest, kwargs["cu_seq_lens_k"].tolist()))
        bounds = cu.tolist()
        parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b],
                                                value[:, :, a:b], is_causal=True, scale=scaling,
                                                enable_gqa=True)
                 for a, b in zip(bounds, bounds[1:])]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None

    AttentionInterface.register("dpo_test_varlen", varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("dpo_test_varlen", flash_attention_mask)
    _, batch = pair_batch()
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation("dpo_test_varlen")
    paths = paths_module.resolve(model)
    assert paths.used() == ["batched", "unmasked", "chunked_head", "tied_buffer", "packed_rows"]
    assert not paths_module.resolve(tiny_model).packed_rows
    got = with_grads(model, batch_logps, batch, paths)
    want = with_grads(tiny_model, batch_logps, batch, PADDED)
    lengths = list(batch.row_lengths)
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    layers = len(model.get_decoder().layers)
    assert seen == [(bounds, max(lengths), bounds)] * layers
    # rows 3+4, 1+2, 5+4 (chosen) and 3+2, 1+4, 5+4 (rejected): 38 tokens, none padding
    assert tokens_run(batch, PACKED) == bounds[-1] == 38
    assert got[1].tolist() == want[1].tolist()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert_all_close(got[2], want[2], rtol=1e-4, atol=1e-6)
