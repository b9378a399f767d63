"""The ``--model tiny`` model and tokenizer: offline, deterministic, real Hugging Face objects."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dpo.core.model.tiny import (
    EOS_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    TINY_NAME,
    build_tiny_model,
    build_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_name():
    assert TINY_NAME == "tiny"


def test_model_is_bit_identical_for_a_seed_and_differs_across_seeds(tokenizer):
    first, second = build_tiny_model(tokenizer, seed=3), build_tiny_model(tokenizer, seed=3)
    assert isinstance(first, LlamaForCausalLM)
    assert same_weights(first, second)
    assert not same_weights(first, build_tiny_model(tokenizer, seed=4))
    assert same_weights(build_tiny_model(), build_tiny_model(tokenizer, seed=0))


def test_building_leaves_the_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_config_matches_tokenizer(tokenizer):
    config = build_tiny_model(tokenizer).config
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert config.bos_token_id is None and tokenizer.bos_token_id is None
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 64 == 0
    assert config._attn_implementation == "sdpa"
    assert config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (64, 2, 4, 2, 128)


def test_save_and_load_give_identical_logits(tokenizer, tmp_path):
    model = build_tiny_model(tokenizer, seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer("the cat sat").input_ids + [tokenizer.eos_token_id]] * 2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded row: the mask path must match too
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("the cat sat").input_ids == tokenizer("the cat sat").input_ids
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.bos_token) == (EOS_TOKEN, PAD_TOKEN, None)
    assert reloaded.chat_template == tokenizer.chat_template


def test_tokenizer_files_are_identical_across_builds(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path / "a")
    build_tiny_tokenizer().save_pretrained(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.json" in names
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("text", [
    "", "Hello, the world!", "  leading and trailing  ", "tabs\tand\nnew\r\nlines\n\n",
    "ünïcödé 你好 🎉 \u200b", "\x00\x01\x7f control bytes", "<|im_start|> looks special",
])
def test_text_round_trips_without_added_tokens(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer(text, add_special_tokens=False).input_ids  # nothing added, no BOS


def test_special_tokens_are_single_ids_and_merges_apply(tokenizer):
    for token in (EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN):
        assert len(tokenizer(token).input_ids) == 1
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id}) == 2
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the").input_ids) == ["Ġthe"]
    assert tokenizer("é").input_ids == [0xC3, 0xA9]  # bytes are ids 0..255


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_training_step_runs_and_changes_the_loss(tokenizer):
    model = build_tiny_model(tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
