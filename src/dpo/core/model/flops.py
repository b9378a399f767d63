"""Model FLOPs of a step, for throughput in FLOP/s and MFU (model FLOPs utilisation).

Counted from the work a step needs, not from what the kernels happen to run (a recomputed
projection in backward, padding, or activation checkpointing add hardware FLOPs, not model
FLOPs), as in the PaLM paper's MFU (Chowdhery et al. 2022, appendix B):

- a weight matrix of P entries costs 2 P FLOPs per token in forward, twice that in backward;
- causal attention costs 2 x 2 d t FLOPs per layer for query t (scores and the weighted sum over
  t keys of width d = heads x head dim): 2 d T^2 per layer for a row of T tokens, summed;
- the output projection runs only at the positions that predict a completion token.

Training counts the policy's forward and backward (3 x forward) and, when the reference scores
the batch in the step, its forward. Backward is the gradient of each layer's input (as much as
its forward) plus, for a weight that trains, the weight's gradient (as much again): so frozen
weights (a LoRA adapter's base) cost 2 P per token in backward, not 4 P, and a step with a LoRA
adapter counts less than 3 x forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopCounter:
    body_params: int  # entries of the decoder layers' weight matrices
    head_params: int  # entries of the output projection (vocabulary x hidden)
    layers: int
    attention_width: int  # query heads x head dim
    trained_body: int | None = None  # of body_params, the entries that train (None: all)
    trained_head: int | None = None  # of head_params, likewise

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopCounter | None:
        """The counter of a Hugging Face decoder; None when its shape cannot be read."""
        from dpo.core.model.activations import decoder_layers_of

        config = getattr(model, "config", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        layers = decoder_layers_of(model)
        if layers is None:
            return None
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if head is None or not heads or not hidden:
            return None
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        matrices = [p for layer in layers for p in layer.parameters() if p.ndim >= 2]
        body = sum(p.numel() for p in matrices)
        trained = sum(p.numel() for p in matrices if p.requires_grad)
        head_trained = head.weight.numel() if head.weight.requires_grad else 0
        return cls(body, head.weight.numel(), len(layers), heads * head_dim, trained, head_trained)

    def forward(self, row_lengths: tuple[int, ...] | list[int], completion_tokens: int) -> float:
        """FLOPs of one forward over rows of these real lengths."""
        return float(sum(2 * self.body_params * t + 2 * self.layers * self.attention_width * t * t
                         for t in row_lengths) + 2 * self.head_params * completion_tokens)

    def train_step(self, row_lengths: tuple[int, ...] | list[int], completion_tokens: int,
                   reference_forward: bool) -> float:
        """Policy forward + backward, and the reference's forward when run in the step."""
        forward = self.forward(row_lengths, completion_tokens)
        tokens = sum(row_lengths)
        attention = sum(2 * self.layers * self.attention_width * t * t for t in row_lengths)
        body = self.body_params if self.trained_body is None else self.trained_body
        head = self.head_params if self.trained_head is None else self.trained_head
        weight_grads = 2 * body * tokens + 2 * head * completion_tokens
        backward = forward + attention + weight_grads  # input gradients, then weight gradients
        return forward * (2 if reference_forward else 1) + backward
