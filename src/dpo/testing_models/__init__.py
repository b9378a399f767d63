"""Models written for dpo-trainer's tests, each as the files a model directory would ship.

``btlm``: a BTLM-style causal language model whose modelling code travels with its weights
(``trust_remote_code=True``); ``dpo.testing.write_btlm_style_model`` writes a tiny one.
"""
