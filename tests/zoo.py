"""A zoo of tiny random causal LMs: one for every model type transformers maps to a causal-LM class.

Not a test module (nothing here is collected): the architecture tests import it to compare fast
log-prob code paths with a naive computation on every architecture the installed transformers
ships. The list is ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, enumerated, never hand-picked (aliases
and types sharing a class are listed each), and a type that cannot be built or trained as a plain
text causal LM comes back with a one-line reason, never silently dropped.

How a tiny config is made (``tiny_config``)
-------------------------------------------
1. The type's config class is instantiated with its defaults (a full-size config; nothing is
   allocated for it) to read the default value of each field (configs are dataclasses).
2. Every field whose name is in ``SIZES`` is set from that one table of small, mutually
   consistent sizes: hidden 64 = 4 heads x 16, 2 kv heads (4 where the default is multi-head or
   latent attention, 1 where it is multi-query), feed-forward 128, MoE 4 experts top-2 of width
   32, vocabulary 256, 512 positions, SSM state 8 with 8 heads x 16 = 2 x hidden, ... A field
   whose default is ``None`` stays ``None`` (except ``SIZES_ALWAYS``), so whatever the class
   derives from other fields (``head_dim``, ``layer_types``, ``qk_head_dim``, ...) is derived
   again for the new sizes. Sub-configs (``text_config``, ``vision_config``, ``attn_config``,
   ...) are shrunk the same way, recursively, and passed as config objects.
3. Special token ids outside the tiny vocabulary are moved to its top (equal ids stay equal).
4. The variant's switches are applied (see ``Variant``), then ``FIXES``: small per-type data
   entries, each with a comment saying why (a default that does not build, a literal per-layer
   pattern, a size given as a keyword argument rather than a field, ...).
5. The config is built as ``config_class(**kwargs)``. The layer count starts at 2 and grows (up
   to 8) only until every kind of layer the full-size config has appears at least once
   (``layer_types``, ``mlp_layer_types``, ``layers_block_type``, ``block_types``, NoPE flags):
   Gemma 3 gets 6 layers (5 sliding : 1 full), Qwen3-Next 4, LFM3 5, SmolLM3 4, most types 2.

``build`` picks the config its class takes (the text config for Llama4ForCausalLM, Qwen3.5, ...;
Musicgen's decoder), counts the parameters on the ``meta`` device (a config that failed to
shrink never allocates: ``MAX_PARAMS``), builds the model in float32 from a seed (torch, Python
and NumPy random states of the caller untouched), and runs a smoke check (``_smoke``): logits
[2, 12, V], finite, identical over two forwards, causal (changing tokens 8.. leaves the logits
of 0..7 alone), and a backward of their sum in training mode.

How to read a reason
--------------------
``tiny_config`` and ``build`` return ``(None, reason)``. Reasons from ``UNSUPPORTED`` are written
by hand ("speculative-decoding drafter: runs on the target model's embeddings ..."); any other
reason is ``"<stage>: <ExceptionType>: <first line of the message>"`` or ``"smoke: <what>"``,
where the stage says how far it got: ``config`` (the class refused the tiny config), ``size``
(still over ``MAX_PARAMS``), ``build`` (the model class raised while constructing, e.g. a missing
optional library), ``forward`` / ``backward`` (the smoke check raised), ``smoke`` (the output was
wrong: its shape, non-finite, two forwards differ, not causal).

Run ``python tests/zoo.py [TYPE ...]`` for one line per variant (parameters and build seconds,
or the reason; for the window / logit_scale / dropout variants, the config fields they set and
whether the logits change), then totals, the reasons grouped, and one table per axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import random
import re
import time
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - transformers needs NumPy, but do not insist here
    np = None

import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# --------------------------------------------------------------------------------------------
# Sizes

WINDOW = 4  # every sliding / local / chunked attention window when window=True

# Logit scalings when logit_scale=True. Multipliers and divisors get LOGIT_SCALE (logits x4 or /4,
# whichever way the config applies it); soft caps get LOGIT_SOFTCAP, small enough that tanh bends
# the logits of these tiny models (|logits| up to about 0.6, std about 0.16, before any scaling).
LOGIT_SCALE = 4.0
LOGIT_SOFTCAP = 0.5

DROPOUT = 0.1  # every dropout-like probability when dropout=True (0.0 otherwise)

VOCAB = 256
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 16
INTERMEDIATE = 128
MOE_INTERMEDIATE = 32
LAYERS = 2
MAX_LAYERS = 8  # the most layers tried so that every kind of layer appears
MAX_POSITIONS = 512
EXPERTS = 4
TOP_K = 2
STATE = 8  # SSM state size
SSM_HEADS = 8  # x SSM_HEAD_DIM = 128 = expand (2) x HIDDEN
SSM_HEAD_DIM = 16
MAX_PARAMS = 2_000_000  # "tiny": refuse (before allocating) anything bigger

# One table: a config field of this name whose default is an int is set to this value.
SIZES: dict[str, int] = {
    # widths
    **dict.fromkeys(["hidden_size", "d_model", "n_embd", "embed_dim", "dim", "emb_dim",
                     "embedding_size", "word_embed_proj_dim", "hidden_size_global",
                     "n_embed", "model_dim", "width"], HIDDEN),
    # feed-forward widths
    **dict.fromkeys(["intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff",
                     "n_inner", "dim_ff", "ffn_hidden_size", "feed_forward_size", "dff",
                     "intermediate_size_mlp", "dense_intermediate_size", "mlp_dim",
                     "first_dense_intermediate_size", "mlp_only_intermediate_size"],
                    INTERMEDIATE),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size",
                     "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "shared_intermediate_size", "shared_experts_intermediate_size"],
                    MOE_INTERMEDIATE),
    # depth
    **dict.fromkeys(["num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers",
                     "encoder_layers", "num_decoder_layers", "num_encoder_layers", "num_blocks"],
                    LAYERS),
    # attention heads
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads",
                     "decoder_attention_heads", "encoder_attention_heads", "attention_heads"],
                    HEADS),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "kv_n_heads"], KV_HEADS),
    **dict.fromkeys(["head_dim", "d_head", "attention_head_dim", "dim_head", "kv_channels", "d_kv",
                     "attention_head_size"], HEAD_DIM),
    # vocabulary and positions
    **dict.fromkeys(["vocab_size", "vocab_size_per_layer_input"], VOCAB),
    "hidden_size_per_layer_input": 16,  # Gemma 3n / 4 per-layer embeddings
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_target_positions",
                     "max_source_positions", "max_seq_len"], MAX_POSITIONS),
    # mixture of experts
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"],
                    EXPERTS),
    **dict.fromkeys(["num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_topk",
                     "moe_k"], TOP_K),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"], 1),
    **dict.fromkeys(["n_group", "num_expert_group", "topk_group"], 1),
    "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE
    # multi-head latent attention (DeepSeek V2/V3 style)
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "qk_head_dim": 24,
    # sparse-attention indexers
    "index_head_dim": 16, "index_n_heads": 2, "index_num_heads": 2,
    # state-space / recurrent layers
    **dict.fromkeys(["state_size", "ssm_state_size", "mamba_d_state", "d_state"], STATE),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], SSM_HEADS),
    **dict.fromkeys(["mamba_d_head", "mamba_head_dim", "mamba_headdim"], SSM_HEAD_DIM),
    **dict.fromkeys(["mamba_n_groups", "n_groups", "mamba_ngroups"], 1),
    **dict.fromkeys(["time_step_rank", "mamba_dt_rank"], 8),
    "mamba_d_ssm": 2 * HIDDEN,
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 16),
    # linear attention (gated delta-net, KDA, lightning style)
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_heads": HEADS, "linear_head_dim": HEAD_DIM,
    # sliding-window attention with its own head layout (Inkling)
    "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS, "swa_head_dim": HEAD_DIM,
    # low ranks and inner widths
    "o_lora_rank": 32, "hc_lowrank": 16, "d_inner": INTERMEDIATE, "rotary_dim": 8,
    "output_embedding_size": HIDDEN, "output_channels": HIDDEN,
    # sparse-attention indexers: keep 8 tokens, so selection bites at test lengths
    "index_topk": 8,
    # side vocabularies: RoCBert shape / pronunciation ids, BLT byte-group hashes
    "shape_vocab_size": 64, "pronunciation_vocab_size": 64, "shape_embed_dim": 32,
    "pronunciation_embed_dim": 32, "encoder_hash_byte_group_vocab": 512,
    "unpadded_vocab_size": VOCAB,
    # Phi-4-multimodal audio encoder
    "nemo_conv_channels": HIDDEN, "depthwise_separable_out_channel": HIDDEN,
    "ext_pw_out_channel": HIDDEN,
    # dots.llm3 vision / audio adapters into the text width
    "adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN, "adapter_input_size": HIDDEN,
}

# Depth fields: set to the layer count being tried.
SIZES_LAYERS = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers",
                "encoder_layers", "num_decoder_layers", "num_encoder_layers", "num_blocks"}
# Set even where the default is None: the defaults of some classes leave them None although their
# models need a value (Hunyuan, Mixtral head_dim; Nemotron kv heads; DeepSeek-V2, dots1 experts).
SIZES_ALWAYS = {"head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts",
                "n_shared_experts"}

# --------------------------------------------------------------------------------------------
# Variant switches: which config fields each axis sets

# Sliding / local / chunked windows: set to WINDOW when window=True, to None when window=False.
WINDOW_FIELDS = ("sliding_window", "sliding_window_size", "attention_window_size",
                 "attention_chunk_size", "window_size", "local_attention_window_len")
# Flags that switch a window on: (value with window, value without).
# None: left as it is.
WINDOW_FLAGS = {"use_sliding_window": (True, False), "use_swa": (True, False),
                "max_window_layers": (1, None)}  # Qwen2-style: layers from this index slide

# Output-logit scalings: (trivial value, non-trivial value). Only those applied between the last
# hidden state and the logits; attention-internal caps keep their defaults.
LOGIT_FIELDS: dict[str, tuple[Any, Any]] = {
    "logits_scaling": (1.0, LOGIT_SCALE),          # Granite (/), HyperCLOVA X (x)
    "lm_head_multiplier": (1.0, LOGIT_SCALE),      # Falcon-H1
    "logit_scale": (1.0, LOGIT_SCALE),             # Cohere
    "logits_mup_width_multiplier": (1.0, LOGIT_SCALE),  # Inkling (hidden / m before the head)
    "final_logit_softcapping": (None, LOGIT_SOFTCAP),   # Gemma 2/3/3n/4, VaultGemma, ...
    "logits_soft_cap": (None, LOGIT_SOFTCAP),      # RecurrentGemma
    "output_logit_soft_cap": (None, LOGIT_SOFTCAP),  # xLSTM
    # MiniCPM3 divides the last hidden state by hidden_size / dim_model_base (None: hidden_size)
    "dim_model_base": (None, int(HIDDEN / LOGIT_SCALE)),
}

# Input-embedding scalings: (neutral value, non-neutral value). Applied to the token embeddings
# before the first layer; some models apply them only when given input_ids, not inputs_embeds.
EMBED_FIELDS: dict[str, tuple[Any, Any]] = {
    "embedding_multiplier": (1.0, LOGIT_SCALE),    # Granite family, Falcon-H1, HyperCLOVA X
    "scale_embedding": (False, True),              # Bart-style decoders: x sqrt(d_model)
    "scale_emb": (1, 4),                           # MiniCPM3
    "embedding_scale": (1.0, LOGIT_SCALE),         # HRM
    "rescale_embeddings": (False, True),           # BigBird
}

# Sub-configs of other modalities: their windows (SAM-style windowed vision attention) are left as
# they are.
_NON_TEXT = re.compile(r"vision|audio|vq_|image|speech")

_DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|layerdrop|^dropout_p$|jitter")

_SPECIAL_ID_NAME = re.compile(r"(_token_id|_token_index|_token_ids|^unk_index|^mask_index"
                              r"|^lang_id|_id)$")

# --------------------------------------------------------------------------------------------
# Per-type data


# Types that are not text causal LMs, with the reason given instead of trying.
UNSUPPORTED: dict[str, str] = {
    "reformer": "trains only on sequences of exactly prod(axial_pos_shape) tokens, and refuses "
                "backward in eval mode",
    "gemma4_assistant": "speculative-decoding drafter: runs on the target model's embeddings and "
                        "shared KV states, not on input_ids",
    "gemma4_unified_assistant": "speculative-decoding drafter: runs on the target model's "
                                "embeddings and shared KV states, not on input_ids",
}


def _window_layers(sliding: str, full: str = "full_attention"):
    """layer_types for a config whose layer types do not follow its window: one sliding layer
    (then full) with window=True, all full otherwise."""
    return lambda variant: [sliding, full] if variant.window else [full, full]


_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}

def _under(sub_config: str, fixes: dict[str, Any]) -> dict[str, Any]:
    """The same fixes for a composite type, in its sub-config."""
    return {f"{sub_config}.{key}": value for key, value in fixes.items()}


# Sliding layers of dots.llm3 take their own MLA sizes from swa_* arguments (defaults: 64 heads,
# rank 1024, head 256), not from the fields shrunk above.
_DOTS3_SWA = {"swa_num_attention_heads": HEADS, "swa_num_key_value_heads": HEADS,
              "swa_q_lora_rank": 32, "swa_kv_lora_rank": 32, "swa_head_dim": 24,
              "swa_qk_nope_head_dim": 16, "swa_v_head_dim": 16}
# KV sharing (Gemma 3n) needs every layer type among the layers that produce a cache: 4 layers,
# the last 2 reusing the first 2.
_GEMMA3N_SHARING = {"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                    "layer_types": ["sliding_attention", "full_attention"] * 2}
# Gemma 4's full-attention layers take head_dim from a global_head_dim argument (default 512):
# twice the sliding layers' head, as in the released models.
_GEMMA4_GLOBAL = {"global_head_dim": 2 * HEAD_DIM}
# Qwen4-Exp's default config does not build: its indexed layers need the QSA indexer sizes, None by
# default. A budget of 8 tokens in blocks of 4 bites at test lengths.
_QWEN4_QSA = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
              "indexer_budget": 8, "indexer_compress_ratio": 4}

# Per-type config fields, set after shrinking: {type: {"field" or "sub_config.field": value}}, a
# value may be a function of the Variant. Each says why.
FIXES: dict[str, dict[str, Any]] = {
    # The default has no attention layer (all Mamba): layer 1 attends.
    "bamba": {"attn_layer_indices": [1]},
    # The default config does not build: the rotary embedding reads one RoPE entry per layer type
    # and the default has none. Its window applies only through layer_types.
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {**_ROPE, "mrope_section": [4, 2, 2]},
                            "sliding_attention": {**_ROPE, "mrope_section": [4, 2, 2]}},
        "layer_types": _window_layers("sliding_attention")},
    # The default config does not build: the attention reads attn_config.rope_theta, which
    # DbrxAttentionConfig does not define; and clip_qkv=None makes it call clamp(None, None), so
    # a clip that never bites.
    "dbrx": {"attn_config.rope_theta": 10_000.0, "attn_config.clip_qkv": 100.0},
    "dots3_note_text": _DOTS3_SWA,
    # (its vision tower's per-layer experts default to a literal 42-layer pattern)
    "dots3_note": {**_under("text_config", _DOTS3_SWA),
                   "vision_config.pyramid_num_routed": [-1, 4]},
    "gemma3n_text": _GEMMA3N_SHARING,
    "gemma3n": _under("text_config", _GEMMA3N_SHARING),
    "gemma4_text": _GEMMA4_GLOBAL,
    "gemma4_unified_text": _GEMMA4_GLOBAL,
    "gemma4": _under("text_config", _GEMMA4_GLOBAL),
    "gemma4_unified": _under("text_config", _GEMMA4_GLOBAL),
    # attention_types is a run-length pattern for 12 pairs of layers: one pair.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # The default is all Mamba layers, which does not run (the mask needs an attention layer).
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # Attention every 8th layer from layer 4 by default: layer 1 of 2 instead (MoE on layer 1).
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    # All layers are full attention by default; sliding layers only through layer_types.
    "laguna": {"layer_types": _window_layers("sliding_attention")},
    "mellum": {"layer_types": _window_layers("sliding_attention")},
    # The default config does not build: layer_types is None and the model indexes it.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # num_heads x head_dim must be expand x hidden_size (128).
    "mamba2": {"num_heads": SSM_HEADS},
    # One codebook, so input_ids are [batch, time] and logits [batch, time, vocab].
    "musicgen": {"decoder.num_codebooks": 1},
    "musicgen_melody": {"decoder.num_codebooks": 1},
    "qwen4_exp_text": _QWEN4_QSA,
    "qwen4_exp": _under("text_config", _QWEN4_QSA),
    # block_types cycles over the layers: (recurrent, recurrent, attention) by default, so 2 layers
    # would have no attention block.
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # Bidirectional by default (masked-LM pretraining): the causal switch.
    "xlm": {"causal": True},
    "xlnet": {"attn_type": "uni"},
    # layers_block_type is a literal 54-layer pattern by default.
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"]},
    "zaya": {"num_experts_per_tok": 1,  # ZAYA supports top-1 routing only
             "layer_types": _window_layers("hybrid_sliding", "hybrid")},
}

# Types whose window=False keeps the default window although the config allows None: the model
# builds a sliding-window mask whatever its layer types, and that needs a window.
WINDOW_REQUIRED = {"ministral", "cohere_compass_text"}

# Calls made on the built model before the smoke check, each with why.
POST_BUILD: dict[str, Any] = {
    # X-MOD routes through per-language adapters and has no default language.
    "xmod": lambda model: model.set_default_language("en_XX"),
}

# Fields a variant axis must not touch for a type, with why.
SKIP_FIELDS: dict[str, set[str]] = {
    # MptConfig.logit_scale, emb_pdrop and resid_pdrop are not read by MptForCausalLM; its only
    # dropout, attn_config.attn_pdrop, is annotated int and so refuses 0.1.
    "mpt": {"logit_scale", "emb_pdrop", "resid_pdrop"},
    "phimoe": {"router_jitter_noise"},  # a deterministic routing threshold, not a random jitter
    "diffllama": {"attention_dropout"},  # refused: differential attention defines no dropout
    "moshi": {"sliding_window"},  # stored by the decoder layers, never applied
    "nemotron_h": {"sliding_window"},  # not read by the model
}

# --------------------------------------------------------------------------------------------
# Public interface


def causal_lm_types() -> list[str]:
    """Every model type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@dataclass(frozen=True)
class Variant:
    """One tiny configuration of a model type; each axis off is the plain model.

    * tied: tie_word_embeddings=True (``variants`` offers it where the model can be built both
      ways; a model that is always tied gets tied=True on every variant).
    * window: every sliding / local / chunked window (``WINDOW_FIELDS``) set to ``WINDOW`` and
      switched on (``WINDOW_FLAGS``, ``FIXES`` layer types). Off: every window None, except where
      the config refuses None or still has layers that need one (Gemma 2/3/4, Cohere 2, GPT-OSS,
      OLMo 3, ..., and ``WINDOW_REQUIRED``): there the default window stays, longer than any test
      sequence. Windows of vision / audio sub-configs are left alone.
    * logit_scale: every output-logit scaling (``LOGIT_FIELDS``) at ``LOGIT_SCALE`` /
      ``LOGIT_SOFTCAP``. Off: 1.0 / None, or the default where the config refuses None (the
      soft caps of Gemma 3n, Inkling 2, RecurrentGemma, xLSTM stay at 30).
    * embed_scale: every input-embedding scaling (``EMBED_FIELDS``) at its non-neutral value,
      tied where the model can be (what it can break is the tied embedding's path). Off: the
      neutral value (1, False).
    * dropout: every dropout-like setting (name matching ``_DROPOUT_NAME``: dropout, *_pdrop,
      layerdrop, router / input jitter noise) at ``DROPOUT``. Off: 0.0 (None stays None).
    """

    model_type: str
    tied: bool = False
    window: bool = False
    logit_scale: bool = False
    dropout: bool = False
    embed_scale: bool = False

    def name(self) -> str:
        """e.g. ``"mistral[untied,window]"``, for pytest ids."""
        tags = ["tied" if self.tied else "untied"]
        tags += [tag for tag, on in (("window", self.window), ("logit_scale", self.logit_scale),
                                     ("embed_scale", self.embed_scale),
                                     ("dropout", self.dropout)) if on]
        return f"{self.model_type}[{','.join(tags)}]"


@contextlib.contextmanager
def _quiet():
    """Warnings ignored and transformers' logger silenced (pytest turns warnings into errors)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    """``"ExceptionType: first line"``, without a dangling "You can install it with pip:"."""
    text = str(error).strip().splitlines()
    line = text[0].strip() if text else ""
    if line.endswith(":") and ". " in line:
        line = line[:line.rindex(". ") + 1]
    return f"{type(error).__name__}: {line}"[:200]


def _fields(cls) -> dict[str, dataclasses.Field]:
    """The config class's own fields (configs are dataclasses in transformers 5)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _allows(field: dataclasses.Field, value) -> bool:
    """Whether the field's annotation admits ``value`` (None, a float where only int is allowed)."""
    annotation = field.type
    if isinstance(annotation, str):
        if value is None:
            return "None" in annotation or "Any" in annotation
        if isinstance(value, float):
            return "float" in annotation or "Any" in annotation or "int" not in annotation
        return True
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else (annotation,)
    for arg in args:
        if arg is typing.Any:
            return True
        if value is None:
            if arg is type(None):
                return True
            continue
        origin = typing.get_origin(arg) or arg
        if origin is typing.Literal:
            if value in typing.get_args(arg):
                return True
        elif not isinstance(origin, type) or isinstance(value, origin):
            return True  # the type, or an annotation we do not interpret: the class decides
    return False


def _sub_config_names(cls, default: PretrainedConfig) -> list[str]:
    names = list(getattr(cls, "sub_configs", {}) or {})
    names += [k for k, v in vars(default).items() if isinstance(v, PretrainedConfig)
              and k not in names]
    return names


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _special_ids(config: PretrainedConfig) -> set[int]:
    """Every special token id of a config and its sub-configs."""
    ids: set[int] = set()
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            ids |= _special_ids(value)
        elif _SPECIAL_ID_NAME.search(name):
            values = value if isinstance(value, (list, tuple)) else [value]
            ids |= {v for v in values if _is_int(v)}
    return ids


class _IdMap:
    """Moves special ids outside the tiny vocabulary to its top, equal ids to equal ids."""

    def __init__(self, used: set[int]):
        self.map: dict[int, int] = {}
        self.free = [i for i in range(VOCAB - 1, VOCAB // 2, -1) if i not in used]

    def __call__(self, value):
        if isinstance(value, (list, tuple)):
            return type(value)(self(v) for v in value)
        if not _is_int(value) or 0 <= value < VOCAB:
            return value
        if value not in self.map:
            self.map[value] = self.free.pop(0)
        return self.map[value]


def _size(name: str, value, values: dict[str, Any], layers: int):
    """The tiny value of a size field, or MISSING to leave it alone."""
    if name in ("num_key_value_heads", "num_kv_heads", "kv_n_heads"):
        heads = next((values[h] for h in ("num_attention_heads", "n_head", "num_heads")
                      if _is_int(values.get(h))), None)
        if value is None or value == heads:
            return HEADS  # multi-head (also latent attention: one kv head per query head)
        if value == 1:
            return 1  # multi-query
        return KV_HEADS
    if name in SIZES_LAYERS:
        return layers
    if value is None and name not in SIZES_ALWAYS:
        return dataclasses.MISSING  # derived from other fields, or a switched-off feature
    if _is_int(value) or value is None:
        return SIZES[name]
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        return [SIZES[name]] * layers  # per-layer sizes (Gemma 3n intermediate_size)
    return dataclasses.MISSING


def _kwargs(default: PretrainedConfig, variant: Variant, layers: int | None, ids: _IdMap,
            keep_window: bool = False, path: str = "", top: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``type(default)``: sizes shrunk (unless ``layers`` is None: then only
    the variant's switches, for the full-size reference) and the variant's switches applied.
    ``keep_window``: window=False keeps the default windows instead of None."""
    cls = type(default)
    fields = _fields(cls)
    aliases = getattr(cls, "attribute_map", {})  # a field may be stored under another name
    values = {name: vars(default)[aliases.get(name, name)] for name in fields
              if aliases.get(name, name) in vars(default)}
    subs = _sub_config_names(cls, default)
    skip = SKIP_FIELDS.get(variant.model_type, set())
    kwargs: dict[str, Any] = {}

    def put(name, value):
        if _allows(fields[name], value):
            kwargs[name] = value

    for name, field in fields.items():
        if name.startswith("_") or name not in values:
            continue
        value = values[name]
        if name in subs:
            if isinstance(value, PretrainedConfig):
                sub = _kwargs(value, variant, layers, ids, keep_window, f"{path}{name}.", top=False)
                kwargs[name] = type(value)(**sub)
            continue
        if name in skip:
            continue
        if layers is not None and name in SIZES:
            size = _size(name, value, values, layers)
            if size is not dataclasses.MISSING:
                put(name, size)
        if layers is not None and _SPECIAL_ID_NAME.search(name) and name not in SIZES:
            mapped = ids(value)
            if mapped != value:
                put(name, mapped)
        if name == "is_decoder" and top:
            put(name, True)  # encoder models (BERT-like) as causal decoders
        # variant axes
        if name == "tie_word_embeddings":
            put(name, variant.tied)
        if name in WINDOW_FIELDS and (value is not None or variant.window) \
                and not _NON_TEXT.search(path):
            if variant.window:
                put(name, WINDOW)
            elif not keep_window:
                put(name, None)  # where the annotation does not allow None, the default stays
        if name in WINDOW_FLAGS and WINDOW_FLAGS[name][0 if variant.window else 1] is not None:
            put(name, WINDOW_FLAGS[name][0 if variant.window else 1])
        if name in LOGIT_FIELDS:
            put(name, LOGIT_FIELDS[name][1 if variant.logit_scale else 0])
        if name in EMBED_FIELDS:
            put(name, EMBED_FIELDS[name][1 if variant.embed_scale else 0])
        if _DROPOUT_NAME.search(name) and (isinstance(value, float) or _is_int(value)
                                           or value is None and "dropout" in name):
            if variant.dropout:
                put(name, DROPOUT)
            elif value is not None:
                put(name, 0.0 if _allows(field, 0.0) else 0)
    if layers is not None:
        for key, value in FIXES.get(variant.model_type, {}).items():
            if key.startswith(path) and "." not in key[len(path):]:
                kwargs[key[len(path):]] = value(variant) if callable(value) else value
    if layers is not None and "head_dim" in kwargs and values.get("head_dim") is not None \
            and values.get("head_dim") == values.get("qk_rope_head_dim"):
        # latent attention (LongCat-Flash): head_dim is the RoPE part of a head
        kwargs["head_dim"] = SIZES["qk_rope_head_dim"]
    return kwargs


_LAYER_PATTERN = re.compile(r"layer|block_type")


def _kinds(config: PretrainedConfig, path: str = "") -> dict[str, set]:
    """The kinds of layer a config has: for each per-layer list (layer_types, block_types,
    no_rope_layers flags, ...), the set of its values."""
    out: dict[str, set] = {}
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            out.update(_kinds(value, f"{path}{name}."))
        elif (isinstance(value, (list, tuple)) and value and _LAYER_PATTERN.search(name)
              and (all(isinstance(v, str) for v in value)
                   or all(v in (0, 1) for v in value))):  # per-layer flags (NoPE layers)
            out[path + name] = set(value)
    return out


_WINDOWED_KIND = re.compile(r"sliding|local|chunk|swa")


def _windowless(config: PretrainedConfig) -> bool:
    """Whether the config has a layer kind that needs a window, but no window."""
    kinds = set().union(*_kinds(config).values()) if _kinds(config) else set()
    return any(isinstance(k, str) and _WINDOWED_KIND.search(k) for k in kinds) \
        and _window_is_none(config)


def _window_is_none(config: PretrainedConfig) -> bool:
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig) and _window_is_none(value):
            return True
        if name in WINDOW_FIELDS and value is None:
            return True
    return False


def _make_config(variant: Variant, layers: int | None, keep_window: bool) -> PretrainedConfig:
    default = CONFIG_MAPPING[variant.model_type]()
    ids = _IdMap(_special_ids(default) & set(range(VOCAB)))
    return type(default)(**_kwargs(default, variant, layers, ids, keep_window))


def tiny_config(variant: Variant) -> tuple[PretrainedConfig | None, str | None]:
    """(config, None), or (None, reason) when no tiny config can be made.

    window=False sets every window to None; where the config refuses None, or still has layers
    that need a window (sliding layers in a fixed layer pattern: Gemma 2/3, Cohere 2, GPT-OSS,
    ...), the default window is kept instead: it is longer than any test sequence.
    """
    if variant.model_type in UNSUPPORTED:
        return None, UNSUPPORTED[variant.model_type]
    with _quiet():
        error = None
        keep = (True,) if variant.model_type in WINDOW_REQUIRED else (False, True)
        for keep_window in keep if not variant.window else (False,):
            try:
                reference = _kinds(_make_config(variant, None, keep_window))
            except Exception:  # noqa: BLE001 - some defaults do not validate: nothing to preserve
                reference = {}
            smallest = None
            for layers in range(LAYERS, MAX_LAYERS + 1):
                try:
                    config = _make_config(variant, layers, keep_window)
                except Exception as e:  # noqa: BLE001 - any refusal is a reason
                    error = error or e
                    continue
                if not keep_window and not variant.window and _windowless(config):
                    smallest = None
                    break  # try again keeping the default window
                smallest = smallest or config
                kinds = _kinds(config)
                if all(kinds.get(k, set()) >= v for k, v in reference.items()):
                    return config, None
            if smallest is not None:
                return smallest, None  # the kinds could not all be had: keep the smallest
        return None, f"config: {_first_line(error)}" if error else "config: no window-less config"


def _model_class(model_type: str):
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _model_config(cls, config: PretrainedConfig) -> PretrainedConfig:
    """The config the class takes: the sub-config of its config class where the type's config is
    a composite (Llama 4's text_config for Llama4ForCausalLM, Musicgen's decoder, ...)."""
    wanted = getattr(cls, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for value in vars(config).values():
        if isinstance(value, wanted):
            return value
    return config


@contextlib.contextmanager
def _own_rng(seed: int | None = None):
    """The caller's random state left as it was: torch's CPU generator forked, Python's and
    NumPy's saved and restored (layerdrop draws from Python's random); seeded if ``seed``."""
    state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
                random.seed(seed)
                if np is not None:
                    np.random.seed(seed)
            yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)


def _count_on_meta(cls, config) -> int:
    with torch.device("meta"):
        model = cls._from_config(config)
    return sum(p.numel() for p in model.parameters())


def _instantiate(cls, config, seed: int):
    attn = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    try:
        with _own_rng(seed):
            model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    except (ValueError, ImportError) as e:
        if attn != "sdpa" or "sdpa" not in str(e).lower():
            raise
        with _own_rng(seed):
            model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.float().eval()


def _forward(model, input_ids):
    kwargs = {"input_ids": input_ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)


def build(variant: Variant, seed: int = 0) -> tuple[torch.nn.Module | None, str | None]:
    """(model, None), or (None, reason) with a one-line reason.

    The model is the class of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` built from the tiny config
    (from its text / decoder sub-config where the class takes that), float32, weights drawn from
    ``seed`` (same seed, bit-identical weights; the caller's random states untouched), attention
    "sdpa" where the class supports it, else "eager", in eval mode, after the smoke check
    (``_smoke``). Call it with ``use_cache=False`` where its forward takes ``use_cache``, as the
    smoke check does: BLT and xLSTM fail with the default cache, and Dory's logits change with it.
    """
    config, reason = tiny_config(variant)
    if config is None:
        return None, reason
    cls = _model_class(variant.model_type)
    config = _model_config(cls, config)
    with _quiet(), _own_rng():
        try:
            params = _count_on_meta(cls, config)
        except Exception as e:  # noqa: BLE001
            return None, f"build: {_first_line(e)}"
        if params > MAX_PARAMS:
            return None, f"size: {params:,} parameters after shrinking (max {MAX_PARAMS:,})"
        try:
            model = _instantiate(cls, config, seed)
        except Exception as e:  # noqa: BLE001
            return None, f"build: {_first_line(e)}"
        try:
            if variant.model_type in POST_BUILD:
                POST_BUILD[variant.model_type](model)
        except Exception as e:  # noqa: BLE001
            return None, f"build: {_first_line(e)}"
        reason = _smoke(model, variant.name())
    if reason is not None:
        return None, reason
    return model, None


# Findings of the smoke checks that are not failures, by variant name (printed by the report).
NOTES: dict[str, str] = {}


def _smoke(model, name: str) -> str | None:
    """None if the model passes, else what is wrong. In eval mode: forward [2, 12] ids twice
    without gradients (logits [2, 12, V], finite, bit-identical), once with tokens 8.. changed
    (logits 0..7 unchanged: causal), once with gradients (a difference from no_grad is only
    noted, in ``NOTES``); then in training mode a forward and a backward of the logits' sum."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.stack([token_ids(model, 12, generator) for _ in range(2)])
    try:
        with torch.no_grad():
            first = _forward(model, ids).logits
            second = _forward(model, ids).logits
    except Exception as e:  # noqa: BLE001
        return f"forward: {_first_line(e)}"
    vocab = _vocab_size(model)
    if tuple(first.shape) != (2, 12, vocab):
        return f"smoke: logits {tuple(first.shape)}, expected (2, 12, {vocab})"
    if not torch.isfinite(first).all():
        return "smoke: non-finite logits"
    if not torch.equal(first, second):
        return "smoke: two forwards in eval mode differ"
    changed = ids.clone()
    changed[:, 8:] = torch.stack([token_ids(model, 4, generator) for _ in range(2)])
    with torch.no_grad():
        prefix = _forward(model, changed).logits[:, :8]
    if not torch.allclose(prefix, first[:, :8], atol=1e-5, rtol=0):
        return "smoke: not causal: logits depend on later tokens"
    try:
        logits = _forward(model, ids).logits.detach()
    except Exception as e:  # noqa: BLE001
        return f"forward: {_first_line(e)} (with gradients)"
    if not torch.equal(logits, first):
        difference = (logits - first).abs().max().item()
        NOTES[name] = f"logits with gradients differ from no_grad by up to {difference:.1e}"
    try:  # backward in training mode, as a trainer runs it (Reformer refuses it in eval mode)
        model.train()
        _forward(model, ids).logits.sum().backward()
    except Exception as e:  # noqa: BLE001
        return f"backward: {_first_line(e)}"
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    return None


def _vocab_size(model_or_config) -> int:
    if isinstance(model_or_config, torch.nn.Module):
        config = model_or_config.config
        sizes = [config.get_text_config(decoder=True).vocab_size]
        embeddings = model_or_config.get_input_embeddings()
        if embeddings is not None and hasattr(embeddings, "num_embeddings"):
            sizes.append(embeddings.num_embeddings)
        return min(sizes)
    return model_or_config.get_text_config(decoder=True).vocab_size


def token_ids(model_or_config, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random ids the model treats as ordinary text tokens: below the vocabulary size (and the
    input embedding's rows), none of the special ids of the config or its sub-configs (every
    field named *_token_id, *_token_index, *_id: pad / bos / eos / unk / mask / sep / cls,
    image / audio / video / boi / eoi placeholders, decoder start, ...), drawn from
    ``generator``. Takes the built model or any config (``tiny_config``'s, or ``model.config``)."""
    config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) \
        else model_or_config
    vocab = _vocab_size(model_or_config)
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    picks = torch.randint(len(allowed), (n,), generator=generator)
    return allowed[picks]


# --------------------------------------------------------------------------------------------
# Variants


def _ties(variant: Variant) -> bool | None:
    """Whether the model built for the variant shares its input embedding with the output
    projection (on the meta device); None where it cannot be built."""
    config, _ = tiny_config(variant)
    if config is None:
        return None
    cls = _model_class(variant.model_type)
    try:
        with _quiet(), _own_rng(), torch.device("meta"):
            model = cls._from_config(_model_config(cls, config))
        embedding = model.get_input_embeddings().weight
    except Exception:  # noqa: BLE001 - the build itself reports why
        return None
    return sum(p is embedding for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _config_dict(variant: Variant) -> dict | None:
    config, _ = tiny_config(variant)
    with _quiet():
        return None if config is None else config.to_dict()


def variants(model_type: str) -> list[Variant]:
    """The variants that apply to a type.

    The base variant (untied, no window, no logit scaling, no dropout), then one variant per axis
    that applies, each changing that axis alone:

    * tied: where the model can be built both tied and untied (checked on the meta device: the
      output projection is, or is not, the input embedding). A model that is always tied (or
      whose config refuses untying) gets tied=True on every variant instead, and no tied variant.
    * window, logit_scale, dropout: where switching the axis on changes the tiny config.
    """
    base = Variant(model_type)
    if model_type in UNSUPPORTED:
        return [base]
    ties = {tied: _ties(Variant(model_type, tied=tied)) for tied in (False, True)}
    possible = {state for state in ties.values() if state is not None}
    tied = possible == {True}
    base = Variant(model_type, tied=tied)
    out = [base]
    if possible == {False, True}:
        out.append(Variant(model_type, tied=True))
    reference = _config_dict(base)
    if reference is None:
        return out
    for axis in ("window", "logit_scale", "embed_scale", "dropout"):
        variant = dataclasses.replace(base, **{axis: True})
        if _config_dict(variant) != reference:
            if axis == "embed_scale" and possible == {False, True}:
                # what embedding scaling can break is the tied embedding's path: tie it
                variant = dataclasses.replace(variant, tied=True)
            out.append(variant)
    return out


def neutral(name: str) -> Any:
    """The value of a scaling field (``LOGIT_FIELDS``, ``EMBED_FIELDS``) that changes nothing."""
    return {**LOGIT_FIELDS, **EMBED_FIELDS}[name][0]


def scaling_fields(model_type: str, axis: str = "logit_scale") -> list[str]:
    """The scaling fields (``LOGIT_FIELDS``, or ``EMBED_FIELDS`` for axis ``embed_scale``)
    that the type's variant on that axis sets."""
    fields = LOGIT_FIELDS if axis == "logit_scale" else EMBED_FIELDS
    base = variants(model_type)[0]
    a = _flat(_config_dict(base) or {})
    b = _flat(_config_dict(dataclasses.replace(base, **{axis: True})) or {})
    changed = {k.rsplit(".", 1)[-1] for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return [name for name in fields if name in changed]


# --------------------------------------------------------------------------------------------

def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))  # noqa: PERF403
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changes(variant: Variant, base: Variant) -> str:
    """The config fields a variant sets differently from the base variant."""
    a, b = _flat(_config_dict(base) or {}), _flat(_config_dict(variant) or {})
    return ", ".join(f"{k}={b.get(k)!r}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k) and not k.endswith("transformers_version"))


def _effect(variant: Variant, model, base_model) -> str:
    """Whether the variant's axis changes what the model computes (report only): logits of 16
    tokens against the base variant's (same seed), differences under 1e-4 taken as rounding."""
    generator = torch.Generator().manual_seed(99)
    ids = token_ids(model, 16, generator)[None]
    with torch.no_grad(), _own_rng():
        if variant.dropout:
            model.train()
            torch.manual_seed(0)
            a, b = _forward(model, ids).logits, _forward(model, ids).logits
            model.eval()
            return "dropout active in train mode" if not torch.equal(a, b) else \
                "NO EFFECT in train mode"
        if base_model is None:
            return "no base model to compare"
        mine, theirs = _forward(model, ids).logits, _forward(base_model, ids).logits
    same_weights = all(p.shape == q.shape and torch.equal(p, q) for p, q in
                       zip(model.state_dict().values(), base_model.state_dict().values()))
    weights = "" if same_weights else " (other weights)"
    if mine.shape != theirs.shape:
        return f"logits of another shape{weights}"
    changed = (mine - theirs).abs().amax(-1)[0].gt(1e-4).nonzero()
    if len(changed) == 0:
        return f"NO EFFECT on the logits{weights}"
    if variant.window:
        return f"logits change from position {int(changed[0, 0])}{weights}"
    return f"logits change{weights}"


if __name__ == "__main__":
    import sys
    from collections import defaultdict

    model_types = sys.argv[1:] or causal_lm_types()
    built, failed, axes = {}, {}, defaultdict(dict)
    n_variants = n_ok = 0
    total = time.perf_counter()
    for model_type in model_types:
        base_model = None
        for i, variant in enumerate(variants(model_type)):
            start = time.perf_counter()
            model, reason = build(variant)
            seconds = time.perf_counter() - start
            n_variants += 1
            if model is None:
                print(f"{variant.name():44s} -- {reason}", flush=True)
                if i == 0:
                    failed[model_type] = reason
                continue
            n_ok += 1
            params = sum(p.numel() for p in model.parameters())
            line = f"{variant.name():44s} OK {params:>9,d} params {seconds:5.2f} s"
            if i == 0:
                built[model_type] = seconds
                base_model, base = model, variant
            else:
                axis = next((a for a in ("window", "logit_scale", "embed_scale", "dropout")
                             if getattr(variant, a)), "tied")
                if axis != "tied":
                    changes, effect = _changes(variant, base), _effect(variant, model, base_model)
                    axes[axis][model_type] = (changes, effect)
                    line += f"  {effect}: {changes}"
            print(line, flush=True)
            if variant.name() in NOTES:
                print(f"{'':44s}    note: {NOTES[variant.name()]}")
    seconds = time.perf_counter() - total
    print(f"\n{len(built)} types built, {len(failed)} not; {n_ok} of {n_variants} variants built;"
          f" {seconds:.1f} s in all, {sum(built.values()):.1f} s for the base variants")
    reasons = defaultdict(list)
    for model_type, reason in failed.items():
        reasons[reason].append(model_type)
    for reason, names in sorted(reasons.items()):
        print(f"  not built: {', '.join(names)}: {reason}")
    for axis, table in axes.items():
        print(f"\n{axis} variants ({len(table)} types):")
        for model_type, (changes, effect) in table.items():
            print(f"  {model_type:28s} {effect}: {changes}")
