"""The BTLM-style model written for the tests of models that ship their own code
(``dpo.testing_models.btlm``, written out by ``dpo.testing.write_btlm_style_model``): the
directory loads with transformers only when its code is trusted, and the modelling code itself:
ALiBi's biases by hand, causality, padding, its own activation checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from dpo.testing import write_btlm_style_model
from dpo.testing_models.btlm.configuration_btlm import BtlmConfig
from dpo.testing_models.btlm.modeling_btlm import (BtlmLMHeadModel, alibi_slopes,
                                                   attention_bias)


def test_the_written_directory_loads_only_when_its_code_is_trusted(tmp_path):
    from transformers import AutoModelForCausalLM

    directory = write_btlm_style_model(tmp_path / "btlm")
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_btlm.BtlmConfig",
                                  "AutoModelForCausalLM": "modeling_btlm.BtlmLMHeadModel"}
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    assert model.lm_head.weight is model.transformer.wte.weight


# -- the modelling code --------------------------------------------------------------------------

def tiny(**overrides) -> BtlmLMHeadModel:
    torch.manual_seed(0)
    config = BtlmConfig(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                        **overrides)
    return BtlmLMHeadModel(config).eval()


def test_alibi_slopes_are_the_papers():
    """2^(-8h/n) for h = 1..n: for n = 4 the exponents are -2, -4, -6, -8; for n = 8, -1 to -8.
    n = 6 (not a power of two): the 4 slopes of n = 4, then the odd ones of n = 8 (2^-1, 2^-3)."""
    assert alibi_slopes(4) == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert alibi_slopes(8) == [2.0 ** -h for h in range(1, 9)]
    assert alibi_slopes(6) == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]


def test_alibi_bias_by_hand():
    """Query i on key j <= i gets -m (i - j); later keys and padded keys are masked."""
    slopes = torch.tensor(alibi_slopes(4))
    masked = torch.finfo(torch.float32).min
    bias = attention_bias(slopes, 3, None)
    assert bias.shape == (1, 4, 3, 3)
    assert bias[0, 0].tolist() == [[0, masked, masked], [-1 / 4, 0, masked],
                                   [-2 / 4, -1 / 4, 0]]
    assert bias[0, 3].tolist() == [[0, masked, masked], [-1 / 256, 0, masked],
                                   [-2 / 256, -1 / 256, 0]]
    padded = attention_bias(slopes, 3, torch.tensor([[0, 1, 1]]))
    assert padded[0, 1].tolist() == [[masked, masked, masked], [masked, 0, masked],
                                     [masked, -1 / 16, 0]]


def test_the_model_adds_the_bias_to_its_scores():
    """With zero queries and keys every score is the bias alone: the attention probabilities
    of head h over keys 0..i are softmax(-m_h (i - j))."""
    model = tiny()
    attn = model.transformer.h[0].attn
    seen = {}
    attn.attn_dropout.register_forward_hook(lambda m, i, o: seen.setdefault("probs", o))
    with torch.no_grad():
        attn.c_attn.weight[:64].zero_()  # the query and key rows of the fused projection
        attn.c_attn.bias[:64].zero_()
        model(torch.tensor([[1, 2, 3]]))
    slope = 1 / 16  # head 2 of 4
    want = torch.tensor([-2 * slope, -slope, 0.0]).softmax(-1)
    assert torch.allclose(seen["probs"][0, 1, 2], want, atol=1e-6)


def test_later_tokens_leave_earlier_logits_alone():
    model = tiny()
    a = torch.tensor([[3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, 4:] = torch.tensor([40, 41])
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert torch.equal(la[0, :4], lb[0, :4])
    assert not torch.allclose(la[0, 4:], lb[0, 4:])


def test_logps_do_not_depend_on_padding_left_or_right():
    model = tiny()
    row = [3, 4, 5, 6, 7]
    pad = 0

    def token_logps(ids, mask, real):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), attention_mask=torch.tensor([mask])).logits[0]
        logps = logits[real][:-1].log_softmax(-1)
        return logps.gather(-1, torch.tensor(row[1:])[:, None])[:, 0]

    alone = token_logps(row, [1] * 5, slice(0, 5))
    left = token_logps([pad] * 3 + row, [0] * 3 + [1] * 5, slice(3, 8))
    right = token_logps(row + [pad] * 3, [1] * 5 + [0] * 3, slice(0, 5))
    assert torch.allclose(left, alone, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)
    assert torch.isfinite(model(torch.tensor([[pad] * 3 + row]),
                                attention_mask=torch.tensor([[0] * 3 + [1] * 5])).logits).all()


def test_labels_give_the_mean_next_token_cross_entropy():
    model = tiny()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    labels = ids.clone()
    labels[0, :2] = -100
    out = model(ids, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[0, 1:4], ids[0, 2:])
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_its_own_gradient_checkpointing_replays_blocks_and_keeps_the_gradient():
    model = tiny()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    calls = []
    model.transformer.h[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert model.transformer.gradient_checkpointing and len(calls) == 2  # forward, then replay
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain[name], atol=1e-6), name


def test_greedy_generation_is_argmax_step_by_step():
    model = tiny()
    ids = torch.tensor([[3, 4, 5]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    want = ids
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, want)
