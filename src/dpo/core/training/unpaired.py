"""The objective of losses over unpaired examples (KTO): each example a prompt and one
completion labelled desirable or undesirable; the unit is the example.

A micro-batch of N examples (``dpo.core.data.unpaired.collate_unpaired``) holds the N examples
and N mismatched rows (each prompt with another example's completion). The policy scores the
examples with graph; the mismatched rows, and the reference's scores of both, run without it.
The KL estimate handed to the loss is the mean over the mismatched rows of policy minus
reference summed log-probs, summed and counted over every process (so that it is one value on
every rank, as the loss's reference point must be), and detached. A micro-batch of one example
has no other completion: it adds no mismatched row to the estimate (an estimate from none is 0,
which the loss's clamp would give anyway for a non-positive one).

The reference is a model in memory (a frozen copy of ``--model``, ``--ref-model``, or a LoRA
policy's base): precomputed reference log-probs are stored per pair, so unpaired runs do not use
them.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo.core.data.batching import Batch
from dpo.core.data.unpaired import TokenizedUnpaired, UnpairedBatch, collate_unpaired, unpaired_length
from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.loss import Loss, LossOutput, UnpairedLogps
from dpo.core.model import lora
from dpo.core.model.flops import FlopCounter
from dpo.core.model.paths import PLAIN, Paths
from dpo.core.training import strategy as strat
from dpo.core.training.objectives import Objective, model_logps
from dpo.core.training.plugin_calls import plugin_call

# Averaged over the examples of each label, not over all examples (``per_label``).
LABELLED = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def global_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count`` with both summed over every process (0 when the count is 0), in
    float32 or, for a float64 ``total``, float64."""
    dtype = torch.promote_types(total.dtype, torch.float32)
    both = torch.stack([total.to(dtype),
                        torch.tensor(float(count), dtype=dtype, device=total.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(both)
    return torch.where(both[1] > 0, both[0] / both[1].clamp(min=1), torch.zeros_like(both[0]))


def kl_estimate(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor
                ) -> torch.Tensor:
    """The detached KL estimate: mean of policy minus reference summed log-probs [M] over the
    mismatched rows (and processes); 0 for M = 0. Float32 at least (float64 log-probs keep
    their precision)."""
    diffs = (policy_mismatched - reference_mismatched).detach()
    diffs = diffs.to(torch.promote_types(diffs.dtype, torch.float32))
    return global_mean(diffs.sum(), diffs.shape[0])


def unpaired_metric_sums(out: LossOutput, logps: UnpairedLogps) -> dict[str, torch.Tensor]:
    """Per-batch sums of the metrics, in TRL's KTO names; ``per_label`` turns the step's (or
    evaluation's) averages into means over each label's examples."""
    chosen = logps.labels.to(logps.policy.device).float()
    rejected = 1 - chosen
    n = out.losses.shape[0]
    sums = {
        "loss": out.losses.detach().sum(),
        "rewards/chosen": (out.chosen_rewards.detach() * chosen).sum(),
        "rewards/rejected": (out.rejected_rewards.detach() * rejected).sum(),
        "logps/chosen": (logps.policy.detach() * chosen).sum(),
        "logps/rejected": (logps.policy.detach() * rejected).sum(),
        "count/chosen": chosen.sum(),
        "count/rejected": rejected.sum(),
    }
    for key, value in out.metrics.items():
        value = value.detach().float()
        sums[key] = value.sum() if value.ndim else value * n
    return sums


def per_label(metrics: dict[str, float]) -> dict[str, float]:
    """Averages over all examples to TRL's KTO metrics: ``rewards/chosen`` and ``logps/chosen``
    over the desirable examples, ``*/rejected`` over the undesirable ones (left out when there
    are none), ``rewards/margins`` their difference, and ``fraction/chosen`` the share of
    desirable examples."""
    out = dict(metrics)
    counts = {"chosen": out.pop("count/chosen", 0.0), "rejected": out.pop("count/rejected", 0.0)}
    for key in LABELLED:
        count = counts[key.split("/")[1]]
        if key in out:
            if count > 0:
                out[key] = out[key] / count  # both averaged over all examples: the ratio is exact
            else:
                del out[key]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["fraction/chosen"] = counts["chosen"]
    return out


class KtoObjective(Objective):
    """Unpaired examples through an unpaired loss plugin (KTO), against a reference model in
    memory (``reference``, or the LoRA policy's base with ``base_reference``)."""

    name = "kto"
    unit = "examples"

    def __init__(self, backend: Backend, dtype: torch.dtype, pad_token_id: int, loss: Loss,
                 paths: Paths = PLAIN, reference: torch.nn.Module | None = None,
                 ref_paths: Paths | None = None, base_reference: bool = False):
        super().__init__(backend, dtype, pad_token_id, paths)
        self.loss, self.reference, self.ref_paths = loss, reference, ref_paths
        self.base_reference = base_reference

    def length(self, example: TokenizedUnpaired) -> int:
        return unpaired_length(example)

    def weight(self, example: TokenizedUnpaired) -> int:
        return 1

    def collate(self, examples: list[TokenizedUnpaired]) -> Batch:
        return collate_unpaired(examples, self.pad_token_id, pad_length=self.backend.padded_length)

    def logps(self, model: torch.nn.Module, batch: UnpairedBatch) -> UnpairedLogps:
        """The policy's (with graph) and reference's summed log-probs of the examples, and the
        KL estimate from their mismatched rows."""
        n = batch.num_examples
        examples = batch.select(list(range(n)))
        # One example: its mismatched row would be itself, which says nothing of the KL.
        scored = batch if n > 1 else examples
        with self.backend.autocast(self.dtype):
            with torch.no_grad():
                ref = None
                if self.reference is not None:
                    ref_paths = self.paths if self.ref_paths is None else self.ref_paths
                    ref, _ = model_logps(self.reference, scored, ref_paths)
                elif self.base_reference:
                    with lora.adapter_disabled(strat.unwrap(model)):
                        ref, _ = model_logps(model, scored, self.paths)
                if n > 1:
                    kl_policy, _ = model_logps(model, batch.select(list(range(n, 2 * n))),
                                               self.paths)
            logps, counts = model_logps(model, examples, self.paths)
        if ref is None:
            kl = global_mean(torch.zeros((), device=logps.device), 0)
        else:
            kl = kl_estimate(kl_policy if n > 1 else ref[:0], ref[n:])
        return UnpairedLogps(policy=logps, labels=batch.labels, tokens=counts, kl=kl,
                             reference=None if ref is None else ref[:n])

    def forward(self, model: torch.nn.Module, batch: Batch, what: str
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = self.logps(model, batch)  # type: ignore[arg-type]
        out = plugin_call(self.loss, what, self.loss, logps)
        return out.losses.sum(), unpaired_metric_sums(out, logps)

    def models(self) -> list[torch.nn.Module]:
        return [self.reference] if self.reference is not None else []

    def flops(self, counter: FlopCounter, batch: Batch) -> float:
        # The mismatched rows run forward only (twice: policy and reference) and the examples
        # once more through the reference; counted as a training step over every row with a
        # reference forward, a slight overcount of the mismatched rows' backward.
        return counter.train_step(batch.row_lengths, batch.completion_tokens,
                                  reference_forward=self.reference is not None
                                  or self.base_reference)

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        return per_label(metrics)

    def step_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return per_label(metrics)
