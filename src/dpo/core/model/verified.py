"""The architectures each speed path is verified on (``dpo.core.model.paths``).

One entry per transformers model type: the speed paths that ``tests/test_architectures.py``
shows to compute what the naive computation does (each sequence alone through the model's own
forward, full logits, log-softmax) on tiny random models of that type, tied and untied, with and
without a sliding window small enough to bite, with and without logit and embedding scaling,
with every dropout probability of the config at 0.1: log-probs, the DPO loss and every
gradient. The test fails if an entry claims a path that is not exact, so the table cannot drift
from the code. ``python tests/archcheck.py [TYPE ...] > probe.jsonl`` tries every path on its
own, and ``python tests/archcheck.py --suggest < probe.jsonl`` prints the entries it supports:
that is how this table was written (transformers 5.25), and how to add a type.

- ``window``: the config attributes that hold the type's attention windows (sliding, local or
  chunked attention; an int, or a list per layer). Shared-prompt groups are kept within the
  smallest.
- ``neutral_head``: config attributes that transform the logits (or the hidden state before
  the head) unless they hold the neutral value given; at another value the paths through the
  head (``chunked_head`` and those built on it) are off.
- ``neutral_embedding``: config attributes that scale the token embeddings where the model
  makes them from ids itself (and not from ``inputs_embeds``) unless they hold the neutral
  value given; at another value ``tied_buffer`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arch:
    paths: frozenset[str]
    window: tuple[str, ...] = ()
    neutral_head: tuple[tuple[str, Any], ...] = ()
    neutral_embedding: tuple[tuple[str, Any], ...] = ()


ALL = frozenset({"batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt", "packed_rows",
                 "layer_checkpointing"})


VERIFIED: dict[str, Arch] = {
    "afmoe": Arch(ALL, window=("sliding_window",)),
    "apertus": Arch(ALL),
    "apertus1p5_text": Arch(ALL),
    "arcee": Arch(ALL),
    "aria_text": Arch(ALL),
    "axk1": Arch(ALL),
    "axk2": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "bailing_hybrid": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "bamba": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "bart": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "beam": Arch(ALL, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "bert": Arch(frozenset({"batched", "unmasked"})),
    "bert-generation": Arch(ALL - {"layer_checkpointing"}),
    "big_bird": Arch(frozenset({"batched", "unmasked"})),
    "bigbird_pegasus": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "biogpt": Arch(ALL - {"tied_buffer"}),
    "bitnet": Arch(ALL),
    "blenderbot": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "blenderbot-small": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "bloom": Arch(ALL - {"packed_rows"}),
    "blt": Arch(frozenset({"batched", "unmasked", "chunked_head"})),
    "camembert": Arch(frozenset({"batched", "unmasked"})),
    "codegen": Arch(ALL),
    "cohere": Arch(ALL, neutral_head=(("logit_scale", 1.0),)),
    "cohere2": Arch(ALL, window=("sliding_window",), neutral_head=(("logit_scale", 1.0),)),
    "cohere2_moe": Arch(ALL, window=("sliding_window",), neutral_head=(("logit_scale", 1.0),)),
    "cohere_compass_text": Arch(ALL, window=("sliding_window",), neutral_head=(("logit_scale", 1.0),)),
    "ctrl": Arch(ALL),
    "cwm": Arch(ALL, window=("sliding_window",)),
    "data2vec-text": Arch(frozenset({"batched", "unmasked"})),
    "dbrx": Arch(ALL - {"tied_buffer"}),
    "deepseek_v2": Arch(ALL),
    "deepseek_v3": Arch(ALL),
    "deepseek_v32": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "deepseek_v4": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "diffllama": Arch(ALL),
    "doge": Arch(ALL - {"packed_rows"}, window=("keep_window_size", "sliding_window")),
    "dory": Arch(frozenset({"batched", "unmasked", "layer_checkpointing"})),
    "dots1": Arch(ALL, window=("sliding_window",)),
    "dots3_note": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "dots3_note_text": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "electra": Arch(frozenset({"batched", "unmasked"})),
    "emu3": Arch(ALL),
    "ergo": Arch(ALL - {"tied_buffer"}, window=("sliding_window",)),
    "ernie": Arch(frozenset({"batched", "unmasked"})),
    "ernie4_5": Arch(ALL),
    "ernie4_5_moe": Arch(ALL),
    "exaone": Arch(ALL),
    "exaone4": Arch(ALL, window=("sliding_window",)),
    "exaone_moe": Arch(ALL, window=("sliding_window",)),
    "falcon": Arch(ALL - {"packed_rows"}),
    "falcon_h1": Arch(ALL - {"shared_prompt", "packed_rows"}, neutral_head=(("lm_head_multiplier", 1.0),), neutral_embedding=(("embedding_multiplier", 1.0),)),
    "falcon_mamba": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "flex_olmo": Arch(ALL),
    "flint": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "fuyu": Arch(ALL),
    "gemma": Arch(ALL - {"tied_buffer"}),
    "gemma2": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "gemma3": Arch(ALL - {"tied_buffer"}, window=("sliding_window",)),
    "gemma3_text": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "gemma3n_text": Arch(ALL - {"tied_buffer", "packed_rows"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "gemma4": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "gemma4_text": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "gemma4_unified": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "gemma4_unified_text": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "git": Arch(ALL - {"shared_prompt", "packed_rows", "layer_checkpointing"}),
    "glm": Arch(ALL),
    "glm4": Arch(ALL),
    "glm4_moe": Arch(ALL),
    "glm4_moe_lite": Arch(ALL),
    "glm_moe_dsa": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "got_ocr2": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "gpt-sw3": Arch(ALL),
    "gpt2": Arch(ALL),
    "gpt_bigcode": Arch(ALL),
    "gpt_neo": Arch(ALL - {"packed_rows"}, window=("window_size",)),
    "gpt_neox": Arch(ALL),
    "gpt_neox_japanese": Arch(ALL - {"packed_rows"}),
    "gpt_oss": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "gptj": Arch(ALL),
    "granite": Arch(ALL, neutral_head=(("logits_scaling", 1.0),)),
    "granite_swa": Arch(ALL - {"packed_rows"}, window=("sliding_window",), neutral_head=(("logits_scaling", 1.0),)),
    "granitemoe": Arch(ALL, neutral_head=(("logits_scaling", 1.0),)),
    "granitemoe_swa": Arch(ALL - {"packed_rows"}, window=("sliding_window",), neutral_head=(("logits_scaling", 1.0),)),
    "granitemoehybrid": Arch(ALL - {"shared_prompt", "packed_rows"}, neutral_head=(("logits_scaling", 1.0),)),
    "granitemoeshared": Arch(ALL, neutral_head=(("logits_scaling", 1.0),)),
    "helium": Arch(ALL),
    "hrm_text": Arch(ALL - {"layer_checkpointing"}),
    "hunyuan_v1_dense": Arch(ALL),
    "hunyuan_v1_moe": Arch(ALL),
    "hy_v3": Arch(ALL),
    "hy_v4": Arch(frozenset({"chunked_head", "tied_buffer", "layer_checkpointing"})),
    "hyperclovax": Arch(ALL, neutral_head=(("logits_scaling", 1.0),)),
    "inkling2_loop_text": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}, neutral_head=(("final_logit_softcapping", None),)),
    "inkling2_text": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}, neutral_head=(("final_logit_softcapping", None),)),
    "inkling_text": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}, neutral_head=(("logits_mup_width_multiplier", 1.0),)),
    "internlm3": Arch(ALL),
    "iquestcoder": Arch(ALL),
    "jais2": Arch(ALL),
    "jamba": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "jetmoe": Arch(ALL),
    "kimi_linear": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "kolibri1": Arch(ALL, window=("sliding_window",)),
    "kolibri1_1": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "laguna": Arch(ALL, window=("sliding_window",)),
    "lara_mini": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "lfm2": Arch(ALL),
    "lfm2_moe": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "lfm3": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "llama": Arch(ALL),
    "llama4": Arch(frozenset({"batched", "unmasked"})),
    "llama4_text": Arch(frozenset({"batched", "unmasked"})),
    "longcat_flash": Arch(ALL),
    "mamba": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "mamba2": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "marian": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "mbart": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "megatron-bert": Arch(frozenset({"batched", "unmasked"})),
    "mellum": Arch(ALL, window=("sliding_window",)),
    "mimo_v2_flash": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "minicpm3": Arch(ALL - {"tied_buffer", "packed_rows"}, neutral_head=(("dim_model_base", None),)),
    "minicpm5_moe": Arch(ALL),
    "minimax": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "minimax_m2": Arch(ALL),
    "minimax_m3_vl_text": Arch(ALL),
    "ministral": Arch(ALL, window=("sliding_window",)),
    "ministral3": Arch(ALL, window=("sliding_window",)),
    "mistral": Arch(ALL, window=("sliding_window",)),
    "mixtral": Arch(ALL, window=("sliding_window",)),
    "mllama": Arch(frozenset({"batched", "unmasked"})),
    "modernbert-decoder": Arch(frozenset({"batched", "unmasked"})),
    "moshi": Arch(ALL - {"tied_buffer"}, window=("sliding_window",)),
    "moss_transcribe_diarize": Arch(ALL, window=("sliding_window",)),
    "mpt": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "musicgen": Arch(frozenset({"batched", "unmasked", "layer_checkpointing"})),
    "musicgen_melody": Arch(frozenset({"batched", "unmasked", "layer_checkpointing"})),
    "mvp": Arch(ALL - {"shared_prompt", "packed_rows"}, neutral_embedding=(("scale_embedding", False),)),
    "nanochat": Arch(ALL, neutral_head=(("final_logit_softcapping", None),)),
    "nemotron": Arch(ALL - {"packed_rows"}),
    "nemotron_h": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "olmo": Arch(ALL),
    "olmo2": Arch(ALL),
    "olmo3": Arch(ALL, window=("sliding_window",)),
    "olmo_hybrid": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "olmoe": Arch(ALL),
    "openai-gpt": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "opt": Arch(ALL),
    "param2moe": Arch(ALL),
    "pegasus": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "persimmon": Arch(ALL),
    "phi": Arch(ALL),
    "phi3": Arch(ALL, window=("sliding_window",)),
    "phi4_multimodal": Arch(ALL, window=("sliding_window",)),
    "phimoe": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "plbart": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "prophetnet": Arch(frozenset({"layer_checkpointing"})),
    "qwen2": Arch(ALL, window=("sliding_window",)),
    "qwen2_moe": Arch(ALL - {"packed_rows"}, window=("sliding_window",)),
    "qwen3": Arch(ALL, window=("sliding_window",)),
    "qwen3_5": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "qwen3_5_moe": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "qwen3_5_moe_text": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "qwen3_5_text": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "qwen3_moe": Arch(ALL, window=("sliding_window",)),
    "qwen3_next": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "qwen4_exp": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "qwen4_exp_text": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "recurrent_gemma": Arch(frozenset({"batched", "unmasked", "layer_checkpointing"})),
    "rembert": Arch(frozenset({"batched", "unmasked"})),
    "roberta": Arch(frozenset({"batched", "unmasked"})),
    "roberta-prelayernorm": Arch(frozenset({"batched", "unmasked"})),
    "roc_bert": Arch(frozenset({"batched", "unmasked"})),
    "roformer": Arch(frozenset({"batched", "unmasked"})),
    "rwkv": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "sarvam_mla": Arch(ALL),
    "sarvam_moe": Arch(ALL),
    "seed_oss": Arch(ALL),
    "smollm3": Arch(ALL, window=("sliding_window",)),
    "solar_open": Arch(ALL),
    "stablelm": Arch(ALL - {"packed_rows"}),
    "starcoder2": Arch(ALL, window=("sliding_window",)),
    "trocr": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "vaultgemma": Arch(ALL - {"tied_buffer"}, window=("sliding_window",), neutral_head=(("final_logit_softcapping", None),)),
    "whisper": Arch(ALL),
    "xglm": Arch(ALL - {"tied_buffer", "packed_rows"}),
    "xlm": Arch(ALL - {"shared_prompt", "packed_rows", "layer_checkpointing"}),
    "xlm-roberta": Arch(frozenset({"batched", "unmasked"})),
    "xlm-roberta-xl": Arch(frozenset({"batched", "unmasked"})),
    "xlnet": Arch(frozenset({"chunked_head", "tied_buffer", "layer_checkpointing"})),
    "xlstm": Arch(frozenset({"batched", "unmasked", "layer_checkpointing"})),
    "xmod": Arch(frozenset({"batched", "unmasked"})),
    "youtu": Arch(ALL),
    "zamba": Arch(ALL - {"tied_buffer", "shared_prompt", "packed_rows"}),
    "zamba2": Arch(ALL - {"shared_prompt", "packed_rows"}),
    "zaya": Arch(ALL - {"shared_prompt", "packed_rows"}),
}

# Types of transformers 5.25 the architecture test cannot build or train as a text causal LM
# (tests/zoo.py says why): no path is verified for them, so they would run the plain path.
# cpmant: smoke: not causal: logits depend on later tokens
# gemma3n: its vision tower needs the timm and Pillow packages (gemma3n_text, the text model, is verified)
# gemma4_assistant: speculative-decoding drafter: runs on the target model's embeddings and shared KV states, not on input_ids
# gemma4_unified_assistant: speculative-decoding drafter: runs on the target model's embeddings and shared KV states, not on input_ids
# reformer: trains only on sequences of exactly prod(axial_pos_shape) tokens, and refuses backward in eval mode
