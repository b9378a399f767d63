"""Configuration of a BTLM-style model (``modeling_btlm``), in GPT-2's names."""

from transformers import PretrainedConfig


class BtlmConfig(PretrainedConfig):
    """A GPT-2-style configuration: ``n_embd`` wide, ``n_layer`` blocks of ``n_head`` heads, a
    SwiGLU feed-forward ``n_inner`` wide (default 8/3 of ``n_embd``, rounded up to a multiple of
    8, which keeps its parameter count that of a 4x GELU feed-forward). ``n_positions`` is only
    a recorded training length: ALiBi needs no position table."""

    model_type = "btlm"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
    }

    def __init__(self, vocab_size=50257, n_positions=2048, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, layer_norm_epsilon=1e-5, initializer_range=0.02, embd_pdrop=0.0,
                 attn_pdrop=0.0, resid_pdrop=0.0, tie_word_embeddings=True, use_cache=False,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs):
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner if n_inner is not None else -(-8 * n_embd // 3 // 8) * 8
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache  # no key/value cache: every forward sees the whole sequence
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)
