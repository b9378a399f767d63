"""Per-sequence summed log-probabilities of completion tokens: the hot path of every step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Config attributes that change logits after the output projection; models carrying them go
# through the plain path, which lets the model apply them itself.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    static_shapes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the completion tokens of each row, in float32.

    Args:
        input_ids: [N, T] token ids, right-padded.
        attention_mask: [N, T], 1 for real tokens.
        completion_mask: [N, T] bool, True where token t belongs to the completion (its
            probability is read from the logits at t - 1). The prompt and padding are False.

    Returns:
        (logps [N] float32, token_counts [N] int64).

    Only the positions that predict a completion token go through the output projection, so
    prompt and padding positions never materialise vocabulary-sized logits. That selection has a
    data-dependent size; with ``static_shapes`` (XLA, see ``Backend.static_shapes``) every
    position is scored and the mask zeroes the others instead, so shapes follow the batch's.
    """
    if static_shapes:
        return _masked_completion_logps(model, input_ids, attention_mask, completion_mask)
    targets_mask = completion_mask[:, 1:]
    targets = input_ids[:, 1:][targets_mask]  # [M]
    rows = torch.nonzero(targets_mask, as_tuple=True)[0]  # [M] row of each target
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    plain = head is None or decoder is None or any(
        getattr(model.config, name, None) for name in _LOGIT_TRANSFORMS
    )
    if plain:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        selected = logits[:, :-1][targets_mask]  # [M, V]
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1][targets_mask]  # [M, H]
        selected = head(hidden)  # [M, V]
    token_logps = -F.cross_entropy(selected.float(), targets, reduction="none")  # [M]
    n = input_ids.shape[0]
    logps = torch.zeros(n, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)
    counts = targets_mask.sum(dim=1)
    return logps, counts


def _masked_completion_logps(model, input_ids, attention_mask, completion_mask):
    """``completion_logps`` without value-dependent shapes: [N, T-1, V] logits, masked sum."""
    targets_mask = completion_mask[:, 1:]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                   reduction="none")  # [N, T-1]
    # where, not a product: a padding position's score must not leak in, even as nan * 0.
    logps = torch.where(targets_mask, token_logps, 0.0).sum(dim=1)
    return logps, targets_mask.sum(dim=1)


def reference_completion_logps(model, input_ids, attention_mask, completion_mask):
    """``completion_logps`` under ``torch.no_grad`` for a frozen reference model."""
    with torch.no_grad():
        return completion_logps(model, input_ids, attention_mask, completion_mask)
