"""A BTLM-style model (GPT-2 blocks, ALiBi attention biases, a SwiGLU feed-forward) as the two
files a model directory ships beside its weights: ``configuration_btlm.py`` and
``modeling_btlm.py``. They import nothing of dpo-trainer, so that transformers can load them
from a model directory as modelling code of its own (``trust_remote_code=True``)."""

from pathlib import Path

# The files a model directory carries, in the order a reader would open them.
MODEL_FILES = ("configuration_btlm.py", "modeling_btlm.py")
SOURCE = Path(__file__).resolve().parent
