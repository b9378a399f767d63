"""``--model tiny``: a small Llama and a byte-level BPE tokenizer built offline, deterministically.

It exists so that tests, examples and ``dpo run --model tiny`` need no download and finish in
seconds on a laptop CPU, while exercising the same code paths as a real checkpoint: a genuine
Hugging Face fast tokenizer with a chat template, and a ``LlamaForCausalLM`` that
``save_pretrained`` / ``from_pretrained`` round-trip.

Special tokens (ChatML, as in Qwen2 instruct models):
  * ``<|im_end|>`` is the EOS: it ends every completion, text or chat, so a completion ends the
    same way in both and generation stops at the end of an assistant turn.
  * ``<|endoftext|>`` is the PAD, distinct from EOS so a padded position is never mistaken for a
    real end of sequence.
  * ``<|im_start|>`` opens a chat turn. There is no BOS token and nothing is added automatically.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

TINY_NAME = "tiny"

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

# A few merges in the byte-level alphabet ("Ġ" is the space byte) so that some tokens span
# several bytes, as in any real BPE; later merges may use earlier results.
MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"),
    ("o", "n"), ("r", "e"), ("Ġ", "s"), ("e", "n"), ("Ġ", "w"), ("o", "u"), ("a", "t"),
    ("Ġ", "i"), ("i", "s"), ("Ġ", "o"), ("in", "g"), ("Ġ", "c"), ("e", "d"),
)

# ChatML. The generation prompt opens an assistant turn; every turn ends with EOS and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

VOCAB_MULTIPLE = 64  # the embedding is padded to a multiple of 64 rows, as real models do


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE: printable Latin-1
    bytes stand for themselves, the others are shifted to code points from 256 up, so every byte
    sequence maps to a string without whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer: ids 0..255 are the bytes, then the merges, then the special tokens.

    Every UTF-8 string encodes and decodes back to itself (all 256 bytes are in the vocabulary).
    """
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A two-layer Llama (~95k parameters): a training step on 8 x 64 tokens takes about 10 ms
    on two CPU cores."""
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.02,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast | None = None,
                     seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with weights drawn from ``seed``: bit-identical for a seed on every call.

    Initialised inside ``fork_rng`` so the caller's global RNG stream is left as it was.
    Attention is ``sdpa``, the default that ``from_pretrained`` picks, so a saved checkpoint
    reloaded plainly (resume, users' own scripts) runs the same kernel and gives identical logits.
    Returned in eval mode, as ``from_pretrained`` returns models; the trainer switches it.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    return model.eval()
