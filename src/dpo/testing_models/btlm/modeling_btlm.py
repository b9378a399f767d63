"""A small BTLM-style causal language model: modelling code that a model directory ships beside
its weights, loaded with ``trust_remote_code=True``.

The shape is that of Cerebras' BTLM family (Dey et al. 2023, "BTLM-3B-8K: 7B Parameter
Performance in a 3B Parameter Model"): a GPT-2 decoder (Radford et al. 2019: pre-LayerNorm
blocks, one fused query/key/value projection ``c_attn``, input and output embeddings tied)
with two changes.

* No position embeddings: each attention head adds a linear bias to its scores instead, ALiBi
  (Press, Smith and Lewis 2022, "Train Short, Test Long: Attention with Linear Biases Enables
  Input Length Extrapolation", section 3). Head ``h`` (1-based) of ``n`` adds
  ``-m_h * (i - j)`` to the score of query ``i`` on key ``j <= i``, with ``m_h = 2^(-8h/n)``
  for ``n`` a power of two. For 4 heads, 8h/n = 2h, so the slopes are 2^-2, 2^-4, 2^-6, 2^-8 =
  1/4, 1/16, 1/64, 1/256: the key 3 tokens back loses 3/4, 3/16, 3/64 and 3/256 in heads 1
  to 4, and a query's own key (distance 0) loses nothing. For ``n`` not a power of two the
  paper takes the slopes of the power of two ``c`` below ``n``, then every other slope of
  ``2c`` (the odd ones: 2^(-4), 2^(-12), ... for c = 2) until there are ``n``.
  Only distances between tokens enter, so a row's left or right padding, masked out, changes
  nothing for its real tokens.
* A SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
  ``FFN(x) = (Swish(x W) * (x V)) W2`` with Swish = SiLU; ``W`` and ``V`` are one fused
  Linear ``c_fc`` (its first half ``W``), ``W2`` is ``c_proj``.

BTLM's maximal-update parametrisation (muP) multipliers are left out: at the scale of tests
they only rescale. There is no key/value cache; generation runs the whole sequence each step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_btlm import BtlmConfig


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi's slope of each head (Press et al. 2022, section 3; see the module docstring)."""
    if n_head & (n_head - 1) == 0:
        return [2.0 ** (-8.0 * h / n_head) for h in range(1, n_head + 1)]
    below = 2 ** math.floor(math.log2(n_head))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][:n_head - below]


def attention_bias(slopes: torch.Tensor, length: int,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch or 1, heads, length, length]`` float32 scores to add: ``-m_h * (i - j)`` where
    query ``i`` may see key ``j`` (``j <= i``, and ``j`` not padding), the lowest float32
    elsewhere (not -inf: a padding query that may see nothing gets a uniform, finite row)."""
    positions = torch.arange(length, device=slopes.device)
    distance = positions[:, None] - positions[None, :]  # i - j
    bias = -slopes[:, None, None] * distance.float()
    allowed = (distance >= 0)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return bias[None].masked_fill(~allowed, torch.finfo(torch.float32).min)


class BtlmAttention(nn.Module):
    def __init__(self, config: BtlmConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        q, k, v = (part.view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
                   for part in self.c_attn(hidden).split(width, dim=2))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        probs = self.attn_dropout(scores.float().softmax(dim=-1).to(v.dtype))
        out = (probs @ v).transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.c_proj(out))


class BtlmMLP(nn.Module):
    """SwiGLU (Shazeer 2020, eq. 6): ``(SiLU(x W) * (x V)) W2``."""

    def __init__(self, config: BtlmConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.n_inner)  # [W | V]
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(hidden).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class BtlmBlock(nn.Module):
    """A pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: BtlmConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = BtlmAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = BtlmMLP(config)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), bias)
        return hidden + self.mlp(self.ln_2(hidden))


class BtlmPreTrainedModel(PreTrainedModel):
    config_class = BtlmConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BtlmBlock"]


class BtlmModel(BtlmPreTrainedModel):
    """Token embeddings, the blocks, a final LayerNorm: the hidden states."""

    def __init__(self, config: BtlmConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(BtlmBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # Set by transformers' activation_checkpointing_enable, with the function to call.
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden = self.drop(inputs_embeds)
        slopes = torch.tensor(alibi_slopes(self.config.n_head), device=hidden.device)
        bias = attention_bias(slopes, hidden.shape[1], attention_mask)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if checkpointed:
                # Only the block's input is kept; backward runs the block again.
                hidden = self._gradient_checkpointing_func(block.__call__, hidden, bias)
            else:
                hidden = block(hidden, bias)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden))


class BtlmLMHeadModel(BtlmPreTrainedModel, GenerationMixin):
    """The decoder and a bias-free output projection tied to the token embeddings; with
    ``labels``, also the mean next-token cross-entropy over labels other than -100."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: BtlmConfig):
        super().__init__(config)
        self.transformer = BtlmModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        # No cache: each step runs the whole sequence so far.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
