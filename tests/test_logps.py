"""Completion log-probabilities: the selective path equals the plain full-logits computation."""

from __future__ import annotations

import torch

from dpo.core.logps import completion_logps


def plain_logps(model, input_ids, attention_mask, completion_mask):
    """The textbook computation: full logits, log-softmax, gather, mask, sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:]
    return (token * mask).sum(-1), mask.sum(-1)


def padded_batch():
    """Two rows, right-padded with id 0: row 0 has 3 prompt + 4 completion tokens (7 real),
    row 1 has 2 prompt + 2 completion tokens (4 real, 3 pads)."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    attention_mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    return input_ids, attention_mask, completion_mask


def test_selective_path_matches_plain_values_counts_and_gradients(tiny_model):
    batch = padded_batch()
    logps, counts = completion_logps(tiny_model, *batch)
    logps.sum().backward()
    grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()

    expected, expected_counts = plain_logps(tiny_model, *batch)
    expected.sum().backward()
    assert counts.tolist() == [4, 2] == expected_counts.tolist()
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (p.grad for p in tiny_model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert logps.dtype == torch.float32 and (logps < 0).all()


def test_padding_does_not_change_a_row(tiny_model):
    """Row 1 alone, unpadded, must give the same log-prob as inside the padded batch."""
    input_ids, attention_mask, completion_mask = padded_batch()
    together, _ = completion_logps(tiny_model, input_ids, attention_mask, completion_mask)
    alone, _ = completion_logps(tiny_model, input_ids[1:, :4], attention_mask[1:, :4],
                                completion_mask[1:, :4])
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-5)
