"""What a training step optimises. The loop (``dpo.core.training.loop``) knows a batch, an
objective and a step; the objective knows its examples.

An objective turns a list of examples into a ``Batch`` and a batch into the sum of its losses
and of its metrics, each in the objective's **unit**: the quantity its loss is a mean over.

* ``DpoObjective``: examples are preference pairs; the unit is the pair. The loss plugin (DPO,
  IPO, ...) gets the policy's and the reference's summed completion log-probs of both sides.
* ``SftObjective``: examples are demonstrations (a prompt and a completion to imitate); the unit
  is the trained token. The loss is the completion tokens' negative log-likelihood, so the
  step's loss is the token mean over the whole step (every micro-batch and every process), not
  a mean of per-batch means that would weigh a short completion's tokens more than a long
  one's.

Both score completions with the same function (``dpo.core.model.logps``), so SFT takes the
speed paths too, chunked output projection included: no [tokens, vocabulary] logits.

Why the loop changed shape: it used to average over pairs, with pairs' batches, the loss plugin
and the reference inside it. The mean a step takes is now the objective's (``weight``: 1 per
pair, or the example's trained tokens), known on the host for the whole step before any
backward, so that gradient and metrics are that mean whatever the micro-batches and processes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from dpo.core.data.batching import Batch, collate, collate_examples
from dpo.core.data.tokenization import TokenizedExample, TokenizedPair
from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.model import lora
from dpo.core.model.flops import FlopCounter
from dpo.core.model.logps import backward_parts, batch_logps
from dpo.core.model.paths import PLAIN, Paths
from dpo.core.training import strategy as strat
from dpo.core.training.plugin_calls import plugin_call


class Objective(ABC):
    """What the loop optimises; see the module docstring."""

    name: ClassVar[str]
    unit: ClassVar[str]  # what the loss is a mean over

    def __init__(self, backend: Backend, dtype: torch.dtype, pad_token_id: int,
                 paths: Paths = PLAIN):
        self.backend, self.dtype, self.pad_token_id, self.paths = (backend, dtype, pad_token_id,
                                                                   paths)

    @abstractmethod
    def length(self, example: Any) -> int:
        """Tokens of the example's longest row: what length grouping sorts by."""

    @abstractmethod
    def weight(self, example: Any) -> int:
        """The example's share of a step's mean, in ``unit``."""

    @abstractmethod
    def collate(self, examples: list[Any]) -> Batch:
        """The examples as one padded batch, on the host."""

    def parts(self, batch: Batch) -> list[Batch]:
        """Sub-batches that may run forward and backward one after the other (same gradient)."""
        return [batch]

    @abstractmethod
    def forward(self, model: torch.nn.Module, batch: Batch, what: str
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the sum of the batch's losses, with graph; metric sums), both in ``unit``s: the
        loop divides by the step's total weight. ``what`` names the call in errors."""

    def models(self) -> list[torch.nn.Module]:
        """Models the objective runs besides the policy (a reference)."""
        return []

    def flops(self, counter: FlopCounter, batch: Batch) -> float:
        """Model FLOPs of a training step's work on ``batch``."""
        return counter.train_step(batch.row_lengths, batch.completion_tokens,
                                  reference_forward=False)

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from an evaluation's averages (none by default)."""
        return metrics

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """A training step's metrics from its averages (as they are by default)."""
        return metrics
    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step, with its averaged metrics (a loss with state updates)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective (its loss's state); none by default."""
        return {}


def model_logps(model: torch.nn.Module, batch: Batch, paths: Paths
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and token counts of each row. A DDP/FSDP-wrapped
    ``LogpsModel`` is called (its forward arms the collectives, and it holds the same paths); a
    plain Hugging Face model goes straight through ``batch_logps``."""
    if strat.is_logps_module(model):
        return model(batch.input_ids, batch.attention_mask, batch.completion_mask,
                     batch.prompt_lengths, batch.row_lengths, batch.paired)
    return batch_logps(model, batch, paths)


# -- DPO and its relatives -------------------------------------------------------------------

def pair_logps(policy: torch.nn.Module, reference: torch.nn.Module | None, batch: Batch,
               backend: Backend, dtype: torch.dtype, paths: Paths = PLAIN,
               ref_paths: Paths | None = None, base_reference: bool = False) -> PairLogps:
    """Policy (with graph) and reference (without) log-probs of a batch's pairs, on their
    speed paths (``ref_paths``: the policy's by default); the reference's come from the batch
    when it carries precomputed ones. ``base_reference``: the reference is the policy with its
    LoRA adapter disabled (``dpo.core.model.lora``)."""
    b = batch.num_pairs
    with backend.autocast(dtype):
        logps, counts = model_logps(policy, batch, paths)
        ref = batch.ref_logps
        if ref is None and reference is not None:
            with torch.no_grad():
                ref, _ = model_logps(reference, batch, paths if ref_paths is None else ref_paths)
        elif ref is None and base_reference:
            with torch.no_grad(), lora.adapter_disabled(strat.unwrap(policy)):
                ref, _ = model_logps(policy, batch, paths)
    return PairLogps(
        policy_chosen=logps[:b], policy_rejected=logps[b:],
        chosen_tokens=counts[:b], rejected_tokens=counts[b:],
        ref_chosen=None if ref is None else ref[:b],
        ref_rejected=None if ref is None else ref[b:],
    )


def metric_sums(out: LossOutput, logps: PairLogps) -> dict[str, torch.Tensor]:
    """Per-batch sums of the TRL-named metrics; divided by the pair count per step."""
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    sums = {
        "loss": out.losses.detach().sum(),
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        # Strict: a tie (e.g. policy == reference) is not a correct preference.
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": logps.policy_chosen.detach().sum(),
        "logps/rejected": logps.policy_rejected.detach().sum(),
        # Per token: a summed log-prob also moves with the completion's length.
        "logps/chosen_per_token": (logps.policy_chosen.detach()
                                   / logps.chosen_tokens.clamp(min=1)).sum(),
    }
    n = out.losses.shape[0]
    for key, value in out.metrics.items():
        value = value.detach().float()
        sums[key] = value.sum() if value.ndim else value * n
    return sums


def pair_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


class DpoObjective(Objective):
    """Preference pairs through a loss plugin, against a reference: a model in memory, the
    log-probs precomputed into ``ref_table``, or none for a reference-free loss."""

    name = "dpo"
    unit = "pairs"

    def __init__(self, backend: Backend, dtype: torch.dtype, pad_token_id: int, loss: Loss,
                 paths: Paths = PLAIN, reference: torch.nn.Module | None = None,
                 ref_paths: Paths | None = None, ref_table: Any = None,
                 backward_by_group: bool = False, base_reference: bool = False):
        super().__init__(backend, dtype, pad_token_id, paths)
        self.loss, self.reference, self.ref_paths = loss, reference, ref_paths
        self.ref_table, self.backward_by_group = ref_table, backward_by_group
        self.base_reference = base_reference

    def length(self, example: TokenizedPair) -> int:
        return pair_length(example)

    def weight(self, example: TokenizedPair) -> int:
        return 1

    def collate(self, examples: list[TokenizedPair]) -> Batch:
        return collate(examples, self.pad_token_id, pad_length=self.backend.padded_length,
                       ref=self.ref_table)

    def parts(self, batch: Batch) -> list[Batch]:
        # A micro-batch the shared prompt cuts into groups: forward and backward group by group.
        return backward_parts(batch, self.paths) if self.backward_by_group else [batch]

    def forward(self, model: torch.nn.Module, batch: Batch, what: str
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = pair_logps(model, self.reference, batch, self.backend, self.dtype, self.paths,
                           self.ref_paths, self.base_reference)
        out = plugin_call(self.loss, what, self.loss, logps)
        return out.losses.sum(), metric_sums(out, logps)

    def models(self) -> list[torch.nn.Module]:
        return [self.reference] if self.reference is not None else []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        plugin_call(self.loss, "on_step()", self.loss.on_step, step, metrics)

    def state_dict(self) -> dict[str, Any]:
        return plugin_call(self.loss, "state_dict()", self.loss.state_dict)

    def flops(self, counter: FlopCounter, batch: Batch) -> float:
        return counter.train_step(
            batch.row_lengths, batch.completion_tokens,
            reference_forward=batch.ref_logps is None and (self.reference is not None
                                                           or self.base_reference))


# -- supervised fine-tuning ------------------------------------------------------------------

def example_length(example: TokenizedExample) -> int:
    return len(example.ids)


def sft_paths(paths: Paths) -> Paths:
    """``paths`` for SFT: the shared prompt off (one completion per prompt)."""
    if not paths.shared_prompt:
        return paths
    return paths.without(["shared_prompt"], "one completion per prompt: nothing to share")


class SftObjective(Objective):
    """Demonstrations: the negative log-likelihood of their trained tokens (the completion;
    in a conversation, the assistant's turns), as a mean over tokens."""

    name = "sft"
    unit = "tokens"
    EVAL_METRICS = ("eval/loss", "eval/perplexity")  # what its evaluations report

    def length(self, example: TokenizedExample) -> int:
        return example_length(example)

    def weight(self, example: TokenizedExample) -> int:
        return example.trained_tokens

    def collate(self, examples: list[TokenizedExample]) -> Batch:
        return collate_examples(examples, self.pad_token_id,
                                pad_length=self.backend.padded_length)

    def forward(self, model: torch.nn.Module, batch: Batch, what: str
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.backend.autocast(self.dtype):
            logps, _ = model_logps(model, batch, self.paths)
        nll = -logps.sum()
        return nll, {"loss": nll.detach()}

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        # The exponential of the token-mean NLL; past float64's range it is inf, as it is.
        loss = metrics.get("loss", math.nan)
        return {**metrics, "perplexity": math.exp(loss) if loss < 709 else math.inf}
