"""TR-DPO: a reference model that learns from the policy during training.

Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"
(arXiv:2404.09656), Sec. 3: every ``tau`` optimizer steps the reference's weights move toward the
policy's,

    soft update (Eq. 4):  theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    hard update (Eq. 5):  theta_ref <- theta                (alpha = 1)

It applies to any loss that scores against a reference (TR-DPO, TR-IPO, ...): the loss plugins
do not change, only the reference they are handed. Here ``tau`` is ``--ref-update-steps`` and
``alpha`` is ``--ref-update-alpha``; the update runs after step ``tau``'s optimizer step (and
after every multiple of it), so step ``tau + 1`` is the first to score against the new reference.

The reference must be a model in memory with the policy's architecture: the update is weight by
weight. Under DDP each rank updates its own replica of the reference from its own replica of the
policy (both the same on every rank, so they stay the same); under FSDP2 both are sharded alike
(the same model, the same units), so each rank updates its local shard of each reference weight
from its local shard of the policy's. A checkpoint keeps the reference's weights
(``REFERENCE_WEIGHTS``), and a resumed run restores them.

Evaluations during training score against the reference as it is at that step (as TRL's does):
right after a hard update the policy is its reference, so the held-out rewards are 0 and
``eval/loss`` is ln 2 there. Stopping on, or picking the best of, ``eval/`` metrics therefore means
less under TR-DPO; ``dpo eval`` scores a run's models against the initial reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo.core.interfaces.errors import UsageError
from dpo.core.training import strategy as strat
from dpo.core.training.distributed import DistInfo

# In a checkpoint of a TR-DPO run: the reference's weights at that step (safetensors).
REFERENCE_WEIGHTS = "reference.safetensors"


@torch.no_grad()
def mix_(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``reference <- alpha * policy + (1 - alpha) * reference`` for every parameter, in place
    (Eq. 4; ``alpha == 1``: a copy, Eq. 5); buffers are copied. Both are modules with the same
    parameter names and shapes (``reference`` may be an FSDP2-sharded copy of the policy's
    architecture: the local shards are mixed). A tied weight is mixed once."""
    for module in (reference, policy):
        _reshard(module)
    ref, pol = strat.unwrap(reference), strat.unwrap(policy)
    # The policy's weights as it saves them: for a model an optimisation pass prepared (e.g.
    # Intel's, with bf16 copies and float32 masters, or prepacked layers), the saved ones are
    # the masters, in the usual layout. Buffers that are not saved come from the module.
    sources = {**dict(pol.named_buffers()), **pol.state_dict()}
    buffers = {name for name, _ in ref.named_buffers()}
    for name, target in [*ref.named_parameters(), *ref.named_buffers()]:
        source = sources.get(name)
        if source is None:
            raise UsageError(f"TR-DPO: the policy has no {name}, which the reference has; the "
                             "reference must have the policy's architecture")
        local, value = _local(target), _local(source)
        if local.shape != value.shape:
            raise UsageError(f"TR-DPO: {name} is {tuple(value.shape)} in the policy and "
                             f"{tuple(local.shape)} in the reference; the reference must have "
                             "the policy's architecture")
        value = value.to(device=local.device, dtype=local.dtype)
        if alpha == 1.0 or name in buffers or not local.is_floating_point():
            local.copy_(value)
        else:
            local.lerp_(value, alpha)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 shard (a DTensor; the same storage), or the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _reshard(module: torch.nn.Module) -> None:
    """Register an FSDP2 module's sharded weights: after a forward without backward (the
    reference) its root unit may still hold the gathered ones."""
    for part in module.modules():
        if hasattr(part, "reshard") and hasattr(part, "set_requires_gradient_sync"):
            part.reshard()


def same_architecture(policy: torch.nn.Module, reference: torch.nn.Module, model: str,
                      ref_model: str) -> None:
    """``--ref-model`` under TR-DPO: its weights must match the policy's name by name and shape
    by shape; otherwise a one-line error naming the first difference."""
    ours = {n: tuple(t.shape) for n, t in policy.state_dict().items()}
    theirs = {n: tuple(t.shape) for n, t in reference.state_dict().items()}
    if ours == theirs:
        return
    name = next(n for n in [*ours, *theirs] if ours.get(n) != theirs.get(n))  # model order
    detail = (f"{name} is {ours[name]} in --model and {theirs[name]} in --ref-model"
              if name in ours and name in theirs else
              f"{name} is only in {'--model' if name in ours else '--ref-model'}")
    raise UsageError(f"--ref-update-steps: --ref-model {ref_model} has another architecture than "
                     f"--model {model} ({detail}); TR-DPO mixes the policy's weights into the "
                     "reference's one by one: give a --ref-model of the same architecture, or drop "
                     "--ref-model")


def check(requires_reference: bool, loss: str) -> None:
    """What a TR-DPO run needs besides its configuration's own checks (``RunConfig``): a loss
    that scores against a reference."""
    if not requires_reference:
        raise UsageError(f"--ref-update-steps: loss {loss!r} uses no reference model, so there "
                         "is none to update; drop --ref-update-steps, or choose a loss with a "
                         "reference (e.g. dpo, ipo)")


def check_resume(checkpoint: Path, precompute_ref: bool) -> None:
    """A checkpoint that holds an updated reference resumes with the reference in memory (then
    the run goes on from that reference, updated or, with ``--ref-update-steps 0``, frozen)."""
    if precompute_ref and (checkpoint / REFERENCE_WEIGHTS).is_file():
        raise UsageError(f"{checkpoint} holds the reference model that TR-DPO updated "
                         f"({REFERENCE_WEIGHTS}), which precomputed log-probs cannot stand "
                         "for: resume with --no-precompute-ref")


def describe(every: int, alpha: float, model: str) -> str:
    """run.json's line on the reference of a TR-DPO run (``model``: what it starts as)."""
    rule = ("a copy of the policy's weights (hard update)" if alpha == 1.0 else
            f"alpha * policy + (1 - alpha) * reference with alpha {alpha:g} (soft update)")
    return (f"{model}, in memory, updated every {every} steps (TR-DPO, alpha {alpha:g}): "
            f"{rule}; its weights are saved with each checkpoint and restored on resume")


class ReferenceUpdate:
    """TR-DPO's schedule over one run's reference model (``reference``: as the objective calls
    it, wrapped under FSDP2): the update after every ``every``-th optimizer step, and the
    reference's weights for a checkpoint."""

    def __init__(self, reference: torch.nn.Module, every: int, alpha: float):
        if every < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"TR-DPO needs every >= 1 and 0 < alpha <= 1, not {every}, {alpha}")
        self.reference, self.every, self.alpha = reference, every, alpha

    def after_step(self, policy: torch.nn.Module, step: int) -> bool:
        """After optimizer step ``step``: the update when it is due; whether it ran."""
        if step % self.every:
            return False
        mix_(self.reference, policy, self.alpha)
        return True

    def state_dict(self, dist: DistInfo) -> dict[str, torch.Tensor] | None:
        """The reference's full weights on CPU, a tied weight once, on rank 0 (``None``
        elsewhere). Collective under FSDP2: every rank calls it."""
        _reshard(self.reference)
        gathered = strat.full_state_dict(self.reference, dist)
        if not dist.is_main:
            return None
        lm = strat.unwrap(self.reference)
        state = gathered if gathered is not None else lm.state_dict()
        return {name: t.detach().to("cpu", copy=True).contiguous()
                for name, t in state.items() if name not in _aliases(lm)}


def load_reference(reference: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's ``REFERENCE_WEIGHTS`` into ``reference`` (sharding it under FSDP2);
    tied names, saved once, are filled in."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for alias, name in _aliases(strat.unwrap(reference)).items():
        if name in state:
            state[alias] = state[name]
    strat.load_full_state_dict(reference, state)


def _aliases(lm: torch.nn.Module) -> dict[str, str]:
    """Second names of tied parameters (e.g. the output head, the input embeddings' weight),
    each to the name ``named_parameters`` keeps."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases
