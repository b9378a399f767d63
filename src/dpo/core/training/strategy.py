"""Many processes: the process group, and the DDP / FSDP2 wrapping of policy and reference.

torch.distributed does the work; this module only decides what to wrap. The unit that gets
wrapped is ``LogpsModel``: a module whose forward is the whole per-sequence log-prob computation
(``dpo.core.model.logps.completion_logps``). Wrapping it, rather than the Hugging Face model, matters
because the log-prob path calls the decoder and the output projection separately (to project only
completion positions): DDP's gradient hooks and FSDP2's all-gathers are armed by the *wrapped*
module's forward, so that forward must be the one the loop calls.

- ``ddp``: the policy is replicated; gradients are averaged across ranks in backward (and only at
  the last micro-batch of an optimizer step, via ``no_sync``). The frozen reference needs no
  wrapper: every rank holds a copy.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each decoder layer and the
  rest of the model across ranks, for the policy and, the same way, the reference. Saving gathers
  a full state dict to rank 0, which writes an ordinary Hugging Face checkpoint.

With one process nothing here wraps anything: the loop sees the Hugging Face model itself.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as dist

from dpo.core.model.activations import decoder_layers_of
from dpo.core.training.distributed import DistInfo
from dpo.core.interfaces.errors import UsageError
from dpo.core.model.paths import Paths

STRATEGIES = ("ddp", "fsdp")
# How long a rank waits in a collective for the others (seconds); a dead peer is normally
# noticed sooner, because torchrun stops every worker when one exits with an error.
TIMEOUT_ENV = "DPO_DIST_TIMEOUT"


class LogpsModel(torch.nn.Module):
    """``forward(input_ids, attention_mask, completion_mask) -> (logps [N], counts [N])``
    around a causal LM; its parameters are the LM's."""

    def __init__(self, lm: torch.nn.Module, paths: Paths):
        super().__init__()
        self.lm = lm
        self.paths = paths  # the speed paths of the run (``dpo.core.model.paths``)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor, prompt_lengths: tuple[int, ...] = (),
                row_lengths: tuple[int, ...] = (), paired: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        from dpo.core.model.logps import rows_logps

        return rows_logps(self.lm, input_ids, attention_mask, completion_mask, prompt_lengths,
                          row_lengths, self.paths, paired=paired)


def is_logps_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a (possibly DDP- or FSDP-wrapped) ``LogpsModel``."""
    return isinstance(getattr(module, "module", module), LogpsModel)


def init_process_group(info: DistInfo, collective: str, device: torch.device) -> None:
    """Join the process group torchrun set up (a no-op for one process)."""
    if info.world_size <= 1 or dist.is_initialized():
        return
    if collective == "xla":
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)
    timeout = float(os.environ.get(TIMEOUT_ENV, 1800))
    kwargs: dict[str, Any] = {"backend": collective, "timeout": timedelta(seconds=timeout)}
    if device.type not in ("cpu", "xla"):
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: FSDP2's sharding units."""
    layers = decoder_layers_of(lm)
    if layers is None:
        raise UsageError(f"--strategy fsdp: cannot find the decoder layers of "
                         f"{type(lm).__name__}; use --strategy ddp")
    return layers


def wrap_policy(lm: torch.nn.Module, strategy: str, info: DistInfo, device: torch.device,
                paths: Paths) -> torch.nn.Module:
    """The policy as the loop calls it: ``lm`` itself for one process, else a wrapped
    ``LogpsModel`` around it."""
    if info.world_size <= 1:
        return lm
    module = LogpsModel(lm, paths)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type in ("cuda", "xpu") else None
        # The only buffers (rotary tables) are constants: no broadcast in every forward, which
        # would also make evaluation a collective under DDP.
        import inspect

        quiet = ("forward_sync_buffers" if "forward_sync_buffers"
                 in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(module, device_ids=device_ids, **{quiet: False})
    return _fully_shard(module)


def wrap_reference(lm: torch.nn.Module | None, strategy: str, info: DistInfo,
                   paths: Paths) -> torch.nn.Module | None:
    """The frozen reference: a full copy per rank under DDP, sharded like the policy under FSDP."""
    if lm is None or info.world_size <= 1 or strategy == "ddp":
        return lm
    return _fully_shard(LogpsModel(lm, paths))


def _fully_shard(module: LogpsModel) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module.lm):
        fully_shard(layer)
    fully_shard(module)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a (possibly wrapped) ``LogpsModel``."""
    inner = getattr(module, "module", module)  # DDP keeps the wrapped module in .module
    return inner.lm if isinstance(inner, LogpsModel) else inner


def _is_fsdp(module: torch.nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")


def no_sync(module: torch.nn.Module, sync: bool) -> ContextManager[Any]:
    """Skip the gradient all-reduce for micro-batches before the last one of a step: DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if _is_fsdp(module):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: Any) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``, whose norm is over the whole model even when parameters are FSDP
    shards (DTensors): the returned norm is then made a plain, replicated tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


def nonfinite_flag(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer
                   ) -> torch.Tensor | None:
    """A device scalar, 1.0 when a parameter or a tensor of the optimizer's state (e.g. AdamW's
    moments) may hold a nan or inf, else 0.0; no host sync (the loop reads it with the next
    step's metrics). One fused 2-norm over them all: a nan or inf anywhere makes it non-finite
    (a max-magnitude norm, which cannot overflow, measured 17x slower on CPU); finite values
    above about 1e19 overflow it too, which ``exactly_finite`` tells apart."""
    tensors = _state_tensors(params, optimizer)
    if not tensors:
        return None
    return (~torch.nn.utils.get_total_norm(tensors, norm_type=2.0).isfinite()).float()


def exactly_finite(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> bool:
    """Every value of this process's parameters and optimizer state is finite (a check per
    tensor: for the rare case ``nonfinite_flag`` raised)."""
    return all(bool(t.isfinite().all()) for t in _state_tensors(params, optimizer))


def _state_tensors(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer
                   ) -> list[torch.Tensor]:
    tensors = []
    for p in params:
        tensors.append(_local(p.detach()))
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel() > 1:
                tensors.append(_local(value))
    return tensors


def _local(tensor: torch.Tensor) -> torch.Tensor:
    local = getattr(tensor, "to_local", None)  # an FSDP2 shard (DTensor): this rank's part
    return local() if local is not None else tensor


def full_state_dict(module: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The Hugging Face model's full state dict on CPU, on rank 0 (``None`` elsewhere). Every
    rank must call it under FSDP: gathering is collective."""
    lm = unwrap(module)
    if not _is_fsdp(getattr(module, "module", module)):
        return None  # the model itself holds full weights: save it as is
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
    if not info.is_main:
        return None
    # A tied parameter (e.g. output head = input embeddings) is gathered once per name; keep
    # the name one process's model would save, so the directory matches a one-process run's.
    kept = {name for name, _ in lm.named_parameters()}
    for name, _ in lm.named_parameters(remove_duplicate=False):
        if name not in kept:
            state.pop(name, None)
    return state


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                         strict: bool = True) -> None:
    """Load a full (Hugging Face) state dict into the model, sharding it under FSDP;
    ``strict=False``: ``state`` holds some of the weights (e.g. a LoRA adapter's)."""
    lm = unwrap(module)
    if _is_fsdp(getattr(module, "module", module)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(lm, state, options=StateDictOptions(full_state_dict=True,
                                                                 strict=strict))
        return
    with torch.no_grad():
        lm.load_state_dict(state, strict=strict)


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo) -> dict[str, Any] | None:
    """The optimizer state to checkpoint, on rank 0. DDP (and one process): rank 0's own, the
    same on every rank. FSDP: gathered in full (collective: every rank calls this)."""
    if _is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return state if info.is_main else None
    return optimizer.state_dict() if info.is_main else None


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    if _is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(module, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def check_launch(nproc: int, backend_name: str, available_devices: int,
                 on_accelerator: bool) -> None:
    """``--nproc N`` must fit the devices: one process per accelerator device."""
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: give at least 1")
    if on_accelerator and nproc > available_devices:
        raise UsageError(f"--nproc {nproc}: backend {backend_name!r} has {available_devices} "
                         f"device(s) here; use at most {available_devices} processes")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ
                                                    and "WORLD_SIZE" in os.environ)
