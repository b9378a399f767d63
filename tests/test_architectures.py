"""Every causal-LM architecture the installed transformers can build, on every path dpo takes.

For each architecture of ``zoo.py`` (enumerated from transformers, never hand-picked; tied and
untied where the config allows; with and without a sliding window of 4 tokens where it has one;
with and without logit scaling where it has one; with every dropout probability at 0.1 where it
has any), one DPO step on four pairs in each mode a run can be in:

- ``plain``: every speed path off;
- ``padded``: the paths a run takes by default off the CPU (``dpo.core.model.paths.resolve``);
- ``shared``: the CPU's default, with the shared prompt where it is verified;
- ``checkpointed``: ``--gradient-checkpointing`` (ours where verified, else transformers' own);
- ``packed``: under a variable-length attention kernel (a stand-in with flash-attention's
  contract), where rows run packed if verified.

In each, the paths the contract turns on must give the naive step's log-probs, loss and every
gradient (``archcheck.exact``), or be off (and then the plain path is what runs). The test
fails if ``dpo.core.model.verified`` claims a path that is not exact. An architecture that cannot be
built or trained as a text causal LM is skipped with its reason (``pytest -ra`` lists them).
"""

from __future__ import annotations

import pytest
import torch

import archcheck
import zoo

from dpo.core.model.logps import batch_logps
from dpo.core.model.paths import PLAIN

pytestmark = pytest.mark.architectures

VARIANTS = [variant for model_type in zoo.causal_lm_types() for variant in zoo.variants(model_type)]


@pytest.fixture(scope="module", autouse=True)
def _varlen_kernel():
    archcheck.register_varlen()


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name() for v in VARIANTS])
def test_every_path_a_run_takes_is_the_naive_step(variant):
    model, reason = archcheck.built(variant)
    if model is None:
        pytest.skip(f"{variant.name()} not built: {reason}")
    pairs, pad = archcheck.make_pairs(model)
    want, ref = archcheck.naive_step(model, pairs)

    # Dropout off for real: two plain forwards in training mode agree, and equal eval mode's.
    batch = archcheck.collate(pairs, pad)
    model.train()
    with torch.no_grad():
        first = batch_logps(model, batch, PLAIN)[0]
        second = batch_logps(model, batch, PLAIN)[0]
        model.eval()
        evaluated = batch_logps(model, batch, PLAIN)[0]
    assert torch.equal(first, second), "training-mode forwards differ: randomness left on"
    torch.testing.assert_close(first, evaluated, rtol=1e-5, atol=1e-5)

    failures, ran = [], []
    for mode in archcheck.MODES:
        got, paths, note = archcheck.run_mode(model, pairs, pad, ref, mode,
                                              rebuild=archcheck.rebuilder(variant))
        if got is None:
            ran.append(f"{mode}: not run ({note})")
            continue
        values, grads, where = archcheck.difference(got, want)
        ran.append(f"{mode}: {', '.join(paths.used()) or 'plain'}")
        if values > archcheck.LOGPS_ATOL or grads > archcheck.GRAD_RTOL:
            failures.append(f"{mode} on [{', '.join(paths.used()) or 'the plain path'}]: "
                            f"log-probs/loss off by {values:.3g}, gradients by {grads:.3g} "
                            f"relative ({where})")
    assert not failures, f"{variant.name()}: " + "; ".join(failures) + " | ran: " + "; ".join(ran)
