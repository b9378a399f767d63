"""The training loop: plain Python over resolved objects. It never touches the plugin manager.

The loop knows a batch, an objective and a step (``dpo.core.training.objectives``: DPO and its
relatives on preference pairs, SFT on demonstrations). One optimizer step:
  1. ``grad_accum`` micro-batches of this process's examples, each collated by the objective.
  2. The objective's forward: the sum of the micro-batch's losses and metrics in its unit (pairs,
     or trained tokens); a micro-batch the objective cuts into parts runs forward and backward
     part by part.
  3. Backward of that sum divided by the step's total weight over every process (known on the
     host from the data order before the step runs), so that the step's gradient is that of the
     mean loss over the whole step, whatever the split into micro-batches and processes.
  4. Clip -> optimizer step -> schedule. A non-finite loss or gradient norm skips the update.
  5. Metrics averaged over the step's units (not per micro-batch), reduced across ranks.
  6. Stopping policies see every step and every evaluation; a stop or pause any process's
     policies decide is every process's.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dpo.core.data.batching import BatchSampler
from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.errors import DpoError, Interrupted, first_line
from dpo.core.interfaces.stopping import Decision, StoppingPolicy
from dpo.core.model import lora
from dpo.core.model.flops import FlopCounter
from dpo.core.model.logps import tokens_run
from dpo.core.training import strategy as strat
from dpo.core.training.checkpoint import rng_states, save_checkpoint, save_model_dir
from dpo.core.training.distributed import DistInfo
from dpo.core.training.layout import BEST, BEST_RECORD, FINAL, PREFIX
from dpo.core.training.objectives import Objective
from dpo.core.training.plugin_calls import plugin_call
from dpo.core.training.refupdate import REFERENCE_WEIGHTS
from dpo.core.training.report import Reporter
from dpo.core.training.rundir import resume_hint

# Keys that depend on wall-clock time; everything else in metrics.jsonl is deterministic on CPU.
TIMING_KEYS = frozenset({"step_time", "tokens_per_second", "padded_tokens_per_second",
                         "samples_per_second", "peak_memory_gb", "memory_gb", "tflops", "mfu"})


@dataclass
class TrainState:
    """Where the run is: optimizer steps done and the position in the data."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Settings:
    total_steps: int
    grad_accum: int
    max_grad_norm: float
    eval_steps: int
    save_steps: int
    save_total_limit: int
    dtype: torch.dtype
    batch_size: int
    eval_at_start: bool = True
    config: dict[str, Any] = field(default_factory=dict)  # kept in each checkpoint


@dataclass
class Trainee:
    """The resolved objects a run trains with."""

    policy: torch.nn.Module
    tokenizer: Any
    backend: Backend
    device: torch.device
    objective: Objective
    policies: dict[str, StoppingPolicy]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_examples: list[Any]  # what the objective takes: pairs, or demonstrations
    eval_examples: list[Any]
    sampler: BatchSampler
    output: Path
    dist: DistInfo = field(default_factory=DistInfo)
    strategy: str = "ddp"  # how the policy is wrapped when ``dist.world_size > 1``
    flops: FlopCounter | None = None  # the policy's model FLOPs, for tflops and MFU
    trust_remote_code: bool = False  # best/ of a model that ships its own code loads with it
    # ``--sample-prompts``: after each evaluation, the policy's generations into samples.jsonl
    samples: Callable[[torch.nn.Module, int], list[Any]] | None = None
    tasks: Any = None  # --eval-tasks: a tasks.TaskRunner, scoring the policy on benchmarks
    # TR-DPO (--ref-update-steps): a refupdate.ReferenceUpdate, moving the reference toward
    # the policy after every N-th optimizer step, its weights kept in each checkpoint
    reference_update: Any = None


@dataclass
class Outcome:
    step: int
    stopped_by: str | None
    reason: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    saved: bool
    initial_eval: dict[str, float] = field(default_factory=dict)  # at step 0, before training
    restored_step: int | None = None  # final weights are those of this step's evaluation
    paused: bool = False  # a policy paused the run (``Decision.resumable``): no final/


def _add(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> None:
    for key, value in part.items():
        total[key] = total[key] + value if key in total else value


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training asks the loop to stop after the step in
    progress and checkpoint it; a second one stops at once. Only in the main thread (signal
    handlers can be set nowhere else); elsewhere the signals keep their usual effect.

    A torchrun worker gets one Ctrl-C twice: from the terminal, and passed on by torchrun a
    moment later. There a second signal within ``REPEAT_SECONDS`` of the first is the same
    request."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 2.0

    def __init__(self, reporter: Reporter, clock: Callable[[], float] = time.monotonic):
        self.requested = False
        self._reporter = reporter
        self._previous: dict[int, Any] = {}
        self._clock = clock
        self._at = 0.0
        self._repeat = self.REPEAT_SECONDS if strat.launched_by_torchrun() else 0.0

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if self._clock() - self._at < self._repeat:
                return
            raise KeyboardInterrupt
        self.requested, self._at = True, self._clock()
        self._reporter.warn("stopping after this step, with a checkpoint; press Ctrl-C again to "
                            "stop at once")


def _averages(sums: dict[str, torch.Tensor], count: float, dist: DistInfo,
              backend: Backend) -> dict[str, float]:
    """One host sync for all metrics of a step."""
    keys = list(sums)
    stacked = torch.stack([sums[k].float() for k in keys] + [torch.tensor(float(count), device=sums[keys[0]].device)])
    dist.all_reduce_sum(stacked)
    # Run everything queued first (XLA: the step's graph, clipped gradients included), so that
    # reading the metrics below is a copy, not a second run of part of the step.
    backend.materialize()
    values = stacked.tolist()
    total = values[-1]
    return {k: v / total for k, v in zip(keys, values[:-1])}


# -- evaluation --------------------------------------------------------------------------------

def evaluate(t: Trainee, settings: Settings) -> dict[str, float]:
    """The objective's metrics of the policy on the held-out examples, under ``eval/`` names."""
    return objective_metrics(t.objective, t.policy, t.eval_examples, settings.batch_size, t.device,
                             t.dist)


def eval_batches(examples: list[Any], length: Callable[[Any], int], batch_size: int,
                 dist: DistInfo) -> list[list[Any]]:
    """This rank's evaluation batches (``length``: an example's tokens, for grouping). Every
    example counts once: the ranks share the first ones evenly (no padding by repeats), and the
    few left over (fewer than the ranks) form a last batch that every rank scores, since a
    sharded model's forward is collective, but that rank 0 alone counts."""
    tail = len(examples) % dist.world_size
    shared = examples[:len(examples) - tail]
    sampler = BatchSampler([length(e) for e in shared], batch_size, seed=0, shuffle=False,
                           rank=dist.rank, world_size=dist.world_size)
    batches = [[shared[i] for i in indices] for indices in sampler.batches(0)]
    if tail:
        batches.append(examples[len(examples) - tail:])
    return batches


def objective_metrics(objective: Objective, policy: torch.nn.Module, examples: list[Any],
                      batch_size: int, device: torch.device, dist: DistInfo | None = None
                      ) -> dict[str, float]:
    """The objective's loss and metrics of ``policy`` on ``examples``, averaged over its unit
    (and ranks), under ``eval/`` names; empty when there are no examples."""
    if not examples:
        return {}
    dist = dist or DistInfo()
    backend = objective.backend
    batches = eval_batches(examples, objective.length, batch_size, dist)
    tail = len(examples) % dist.world_size
    for model in (policy, *objective.models()):  # idempotent; `dpo eval` loads its models itself
        backend.configure_model(strat.unwrap(model))
    was_training = policy.training
    policy.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for i, chunk in enumerate(batches):
            batch = objective.collate(chunk).to(device)
            _, part = objective.forward(policy, batch, "evaluation")
            if not (tail and i == len(batches) - 1) or dist.is_main:
                count += sum(objective.weight(e) for e in chunk)
            else:  # the shared tail: the same keys on every rank, rank 0's values only
                part = {k: torch.zeros_like(v) for k, v in part.items()}
            _add(sums, part)
            backend.materialize()  # one graph per batch shape, not one for the whole set
    policy.train(was_training)
    metrics = objective.derived(_averages(sums, count, dist, backend))
    return {f"eval/{k}": v for k, v in metrics.items()}


# -- the loop ----------------------------------------------------------------------------------

def _decide(policies: dict[str, StoppingPolicy], ask: Callable[[StoppingPolicy], Decision],
            warn: Callable[[str], None] | None = None
            ) -> tuple[tuple[str, Decision] | None, bool]:
    """Every policy sees the metrics (so each one's state stays exact); the first one to stop
    wins. Also says whether a policy that restores its best weights marked these as best.
    A policy's ``warn`` line goes to ``warn``, under its name."""
    stopped, keep_best = None, False
    for name, policy in policies.items():
        decision = plugin_call(policy, "deciding", ask, policy)
        if decision.warn and warn is not None:
            warn(f"{name}: {decision.warn}")
        keep_best = keep_best or (decision.best and policy.restores_best())
        if decision.stop and stopped is None:
            stopped = (name, decision)
    return stopped, keep_best


def _agree(policies: dict[str, StoppingPolicy], stopped: tuple[str, Decision] | None,
           keep_best: bool, dist: DistInfo, device: torch.device
           ) -> tuple[tuple[str, Decision] | None, bool]:
    """Several processes: a stop (or pause) that any process's policies decided is every
    process's, and so is a best mark, so that all of them stop, save and checkpoint alike. A
    policy may decide on what only its own process measures (a clock, its own counts), so the
    processes can disagree. One small all-reduce of each process's first stopping policy (its
    place in ``policies``) and best mark; when one stopped, the winner (the first policy in
    order, from the lowest rank that has it, as ``_decide`` picks within one process) sends its
    ``Decision`` to the others, so the reason and status are the same on every process."""
    names = list(policies)
    world = dist.world_size
    votes = torch.zeros(world + 1, device=device)
    if stopped is not None:
        votes[dist.rank] = names.index(stopped[0]) + 1
    votes[world] = float(keep_best)
    dist.all_reduce_sum(votes)
    codes = [round(v) for v in votes.tolist()]
    keep_best = codes[world] > 0
    if not any(codes[:world]):
        return None, keep_best
    code, winner = min((c, r) for r, c in enumerate(codes[:world]) if c)
    sent = [stopped[1] if dist.rank == winner else None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(sent, src=winner, device=device)
    return (names[code - 1], sent[0]), keep_best


def save_best(t: Trainee, step: int, metrics: dict[str, float]) -> None:
    """Keep these weights as the run's best (``best/``, a Hugging Face directory), with the step
    and the evaluation that made them best, and the loss's state then (e.g. BCO's running mean:
    what ``dpo eval`` of these weights evaluates with)."""
    state = strat.full_state_dict(t.policy, t.dist)  # collective under FSDP: every rank
    if t.dist.is_main:
        record = {"step": step, "metrics": metrics, "loss": t.objective.state_dict()}
        save_model_dir(t.output / BEST, strat.unwrap(t.policy), t.tokenizer,
                       extra={BEST_RECORD: record}, state_dict=state)
    strat.barrier(t.dist)  # restore_best on any rank reads what rank 0 wrote


def restore_best(t: Trainee) -> tuple[int, dict[str, float]] | None:
    """Load the weights kept in ``best/`` into the policy; (step, its evaluation) or None."""
    record_path = t.output / BEST / BEST_RECORD
    if not record_path.is_file():
        return None
    from dpo.core.model.loading import causal_lm

    record = json.loads(record_path.read_text())
    if lora.is_adapted(strat.unwrap(t.policy)):  # best/ holds the adapter alone
        from safetensors.torch import load_file

        saved = load_file(str(t.output / BEST / lora.ADAPTER_WEIGHTS))
        strat.load_full_state_dict(t.policy, lora.model_state(strat.unwrap(t.policy), saved),
                                   strict=False)
    else:
        best = causal_lm(t.output / BEST, trust_remote_code=t.trust_remote_code)
        strat.load_full_state_dict(t.policy, best.state_dict())
    return int(record["step"]), record["metrics"]


class NonFiniteWeights(DpoError):
    """An optimizer step left non-finite values in the weights or the optimizer state."""


class FiniteWatch:
    """Whether the last update left the weights and the optimizer state finite, known without a
    host sync of its own: the flag computed after an update travels with the next step's
    metrics (its one host read, and under several processes its one all-reduce), and is read
    on its own only before anything is saved (a checkpoint, ``best/``, ``final/``), so that
    nothing from a poisoned update is ever written."""

    KEY = "weights_nonfinite"

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 dist: DistInfo, message: Callable[[int, float], str]):
        self.params, self.optimizer, self.dist, self.message = params, optimizer, dist, message
        self.flag: torch.Tensor | None = None
        self.step, self.lr = 0, 0.0

    def updated(self, step: int, lr: float) -> None:
        self.flag = strat.nonfinite_flag(self.params, self.optimizer)
        self.step, self.lr = step, lr

    def add_to(self, sums: dict[str, torch.Tensor], count: float) -> None:
        if self.flag is not None:
            sums[self.KEY] = self.flag.to(sums["loss"].device) * count  # averaged: back to 0/1

    def judge_metrics(self, metrics: dict[str, float]) -> None:
        flagged = metrics.pop(self.KEY, None)
        if flagged is not None:
            self._judge(flagged > 0)

    def settle(self) -> None:
        if self.flag is not None:
            flag = self.flag.clone()
            self.dist.all_reduce_sum(flag)
            self._judge(flag.item() > 0)

    def _judge(self, flagged: bool) -> None:
        self.flag = None
        if flagged and (self.dist.world_size > 1
                        or not strat.exactly_finite(self.params, self.optimizer)):
            # Nothing from this update may be saved: not as a checkpoint, best or final.
            raise NonFiniteWeights(self.message(self.step, self.lr))


def _newest(t: Trainee, checkpointed: list[Path]) -> Path | None:
    from dpo.core.training.checkpoint import latest_checkpoint

    return checkpointed[-1] if checkpointed else latest_checkpoint(t.output)


def _interrupted(t: Trainee, step: int, checkpointed: list[Path]) -> str:
    return f"stopped on request at step {step}" + resume_hint(t.output, _newest(t, checkpointed))


def _poisoned(t: Trainee, step: int, lr: float, checkpointed: list[Path],
              what: str = "made the weights or optimizer state non-finite") -> str:
    newest = _newest(t, checkpointed)
    where = (f"resume from {newest.name} with --resume {t.output} --lr LOWER" if newest
             else "start again with a lower --lr")
    return f"step {step}'s update (learning rate {lr:.3g}) {what}; nothing from it was saved; {where}"


def train(t: Trainee, settings: Settings, state: TrainState, reporter: Reporter,
          on_save: Callable[[Path], None] | None = None) -> Outcome:
    """Run optimizer steps from ``state`` until the step budget or a stopping policy ends it."""
    return Loop(t, settings, state, reporter, on_save).run()


@dataclass
class _StepWork:
    """What one optimizer step's micro-batches did, for its metrics."""

    sums: dict[str, torch.Tensor]  # metric sums, in the objective's unit
    weight: float  # this rank's share of the step's mean (pairs, or trained tokens)
    examples: int  # over every rank
    real_tokens: int = 0  # this rank's
    all_tokens: int = 0  # over every rank (read in the step's sync)
    total_weight: float = 0.0  # the step's weight over every rank
    padded_tokens: int = 0
    flops: float = 0.0


class Loop:
    """One run of the loop over ``Trainee``'s objects. ``run`` reads top to bottom: the baseline
    evaluation, then steps, each followed by the stopping policies, evaluation and checkpoints,
    then the final model."""

    def __init__(self, t: Trainee, settings: Settings, state: TrainState, reporter: Reporter,
                 on_save: Callable[[Path], None] | None = None):
        self.t, self.settings, self.state, self.reporter = t, settings, state, reporter
        self.on_save = on_save
        self.params = [p for p in t.policy.parameters() if p.requires_grad]
        self.epoch_cache: dict[int, list[list[int]]] = {}
        self.checkpointed: list[Path] = []  # written by this process, newest last
        self.watch = FiniteWatch(self.params, t.optimizer, t.dist,
                                 lambda step, lr: _poisoned(t, step, lr, self.checkpointed))
        self.stop_request = StopRequest(reporter)
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.initial_eval: dict[str, float] = {}
        self.stopped: tuple[str, Decision] | None = None

    def run(self) -> Outcome:
        self.t.policy.train()
        self.reporter.start(self.settings.total_steps, self.state.step)
        try:
            self.stop_request.install()
            self.baseline()
            while self.state.step < self.settings.total_steps and not self.stopped:
                self.stop_between_steps()
                stop_now = self.step()
                if self.after_step(stop_now):
                    break
        finally:
            self.stop_request.restore()
            self.reporter.close()
        return self.finish()

    # -- the data's order -----------------------------------------------------------------

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """The epoch's batches over every rank (``BatchSampler.steps``)."""
        if epoch not in self.epoch_cache:
            self.epoch_cache.clear()
            self.epoch_cache[epoch] = self.t.sampler.steps(epoch)
        return self.epoch_cache[epoch]

    def next_steps(self, n: int) -> list[list[int]]:
        """The next ``n`` micro-batches over every rank. A step may straddle an epoch
        boundary; the position stays exact for resume."""
        state = self.state
        taken: list[list[int]] = []
        while len(taken) < n:
            steps = self.epoch_steps(state.epoch)
            if state.micro_in_epoch >= len(steps):
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
                continue
            taken.append(steps[state.micro_in_epoch])
            state.micro_in_epoch += 1
        return taken

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> bool:
        """One optimizer step, its metrics recorded; whether the processes agreed (in the
        step's one sync) to stop after it."""
        t, state = self.t, self.state
        started = time.perf_counter()
        t.backend.reset_peak_memory()
        work = self.accumulate(self.next_steps(self.settings.grad_accum))
        metrics, stop_now = self.update(work)
        if t.reference_update is not None:  # TR-DPO: the next step scores against it
            t.reference_update.after_step(t.policy, state.step)
        t.backend.synchronize()
        self.record_step(metrics, work, time.perf_counter() - started)
        t.objective.on_step(state.step, metrics)  # a loss with state (BCO's running mean)
        self.stopped, keep_best = self.decide(lambda p: p.on_step(state.step, metrics))
        self.drop_late_pause()
        if keep_best:
            self.watch.settle()
            save_best(t, state.step, metrics)
        return stop_now

    def accumulate(self, steps: list[list[int]]) -> _StepWork:
        """Forward and backward of this rank's micro-batches of ``steps``: gradients of the
        mean loss over the whole step."""
        t, objective = self.t, self.t.objective
        rank, world = t.dist.rank, t.dist.world_size
        micro = [[t.train_examples[i] for i in s[rank::world]] for s in steps]
        work = _StepWork({}, sum(objective.weight(e) for m in micro for e in m),
                         sum(len(s) for s in steps))
        # Every rank's weight, so that the mean is over the whole step: DDP/FSDP average
        # gradients over ranks, so each rank divides by the global weight over the ranks.
        # With equal shares (pairs) this is each rank's own weight, the same division.
        share = sum(objective.weight(t.train_examples[i]) for s in steps for i in s) / world
        work.total_weight = share * world
        what = f"step {self.state.step + 1}"
        for i, examples in enumerate(micro):
            parts = objective.parts(objective.collate(examples).to(t.device))
            for j, batch in enumerate(parts):
                losses, sums = objective.forward(t.policy, batch, what)
                # Only the last part of the last micro-batch syncs gradients.
                last = i == len(micro) - 1 and j == len(parts) - 1
                with strat.no_sync(t.policy, sync=last):
                    (losses / share).backward()
                _add(work.sums, sums)
                work.real_tokens += batch.real_tokens
                work.padded_tokens += tokens_run(batch, objective.paths)
                if t.flops is not None:
                    work.flops += objective.flops(t.flops, batch)
            t.backend.materialize()  # one graph per micro-batch shape, however they mix
        return work

    def update(self, work: _StepWork) -> tuple[dict[str, float], bool]:
        """Clip, read the step's metrics (its one host sync), apply the update unless it is
        non-finite, and advance the schedule; (metrics, whether the processes agreed to stop)."""
        t, settings, state, sums = self.t, self.settings, self.state, work.sums
        t.backend.reduce_gradients(t.optimizer)
        max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else math.inf
        # The norm is of the global gradient (the same on every rank): weighting it by the
        # rank's weight makes the cross-rank average below give it back unchanged.
        sums["grad_norm"] = strat.clip_grad_norm(self.params, max_norm) * work.weight
        self.watch.add_to(sums, work.weight)  # the previous update's flag, read in this sync
        if t.dist.world_size > 1:  # ranks agree on a stop request through the same sync
            sums["stop_requested"] = torch.tensor(float(self.stop_request.requested),
                                                  device=sums["loss"].device)
            # and learn the step's tokens over every rank (averaged by the step's weight)
            sums["all_tokens"] = torch.tensor(float(work.real_tokens), device=sums["loss"].device)
        metrics = _averages(sums, work.weight, t.dist, t.backend)
        stop_now = metrics.pop("stop_requested", 0.0) > 0
        work.all_tokens = (round(metrics.pop("all_tokens") * work.total_weight)
                           if "all_tokens" in metrics else work.real_tokens)
        self.watch.judge_metrics(metrics)
        metrics = t.objective.step_metrics(metrics)
        lr = t.scheduler.get_last_lr()[0]
        # Decided on the host from the values just read, so skipping costs no extra sync.
        if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
            try:
                t.optimizer.step()
            except RuntimeError as exc:  # e.g. Intel's fused AdamW: lr * decay overflows
                raise NonFiniteWeights(_poisoned(
                    t, state.step + 1, lr, self.checkpointed,
                    f"failed in the optimizer ({first_line(exc, limit=200)})")) from exc
            self.watch.updated(state.step + 1, lr)
        else:
            self.reporter.warn(f"step {state.step + 1}: non-finite loss or gradient; update "
                               "skipped")
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.backend.step_end()
        state.step += 1
        metrics["lr"] = lr
        return metrics, stop_now

    def record_step(self, metrics: dict[str, float], work: _StepWork, elapsed: float) -> None:
        """The step's speed and memory beside its averages, into metrics.jsonl and progress."""
        t, state, world = self.t, self.state, self.t.dist.world_size
        epoch_len = max(len(self.epoch_steps(state.epoch)), 1)
        metrics.update({
            "epoch": round(state.epoch + state.micro_in_epoch / epoch_len, 6),
            "step_time": elapsed,
            "tokens_per_second": work.all_tokens / elapsed,
            "padded_tokens_per_second": work.padded_tokens * world / elapsed,
            "samples_per_second": work.examples / elapsed,
        })
        memory = t.backend.memory_stats()
        if memory.peak_bytes is not None:
            metrics["peak_memory_gb"] = memory.peak_bytes / 2**30
        if work.flops:  # per process: each one's device does its own share
            metrics["tflops"] = work.flops / elapsed / 1e12
            peak = t.backend.peak_flops(self.settings.dtype)
            if peak:
                metrics["mfu"] = work.flops / elapsed / peak
        metrics.update(t.backend.step_metrics())
        self.train_metrics = metrics
        self.reporter.record({"step": state.step, **metrics})
        self.reporter.step(state.step, metrics)

    # -- between steps ----------------------------------------------------------------------

    def baseline(self) -> None:
        """The evaluation before training (DPO: the policy is its reference here, unless
        --ref-model names another)."""
        t = self.t
        if not self.state.step and self.settings.eval_at_start:
            self.score_tasks(0)
        if self.state.step or not (self.settings.eval_at_start and t.eval_examples):
            return
        self.initial_eval = self.eval_metrics = evaluate(t, self.settings)
        self.reporter.record({"step": 0, **self.initial_eval})
        self.write_samples(0)
        self.stopped, keep_best = self.decide(lambda p: p.on_eval(0, self.initial_eval))
        if keep_best:
            save_best(t, 0, self.initial_eval)
        if self.stopped and self.stopped[1].save:
            self.checkpoint()

    def write_samples(self, step: int) -> None:
        """The policy's generations for the evaluation just recorded (``--sample-prompts``)."""
        if self.t.samples is None:
            return
        samples = self.t.samples(self.t.policy, step)
        if samples:  # the loggers show them as a table (W&B, MLflow, TensorBoard's text)
            # The columns of samples.jsonl's lines (``label`` where they have it), less the step.
            lines = [s.as_dict() for s in samples]
            columns = [key for key in lines[0] if key != "step"]
            self.reporter.table("samples", columns,
                                [[line[c] for c in columns] for line in lines], step)

    def stop_between_steps(self) -> None:
        """A stop asked for between steps (e.g. during an evaluation), in one process: the
        last step's checkpoint, then out."""
        t, step = self.t, self.state.step
        if self.stop_request.requested and t.dist.world_size == 1:
            if step and not (t.output / f"{PREFIX}{step}").is_dir():
                self.checkpoint()
            raise Interrupted(_interrupted(t, step, self.checkpointed))

    def after_step(self, stop_now: bool) -> bool:
        """Evaluation, the stopping policies' say and checkpoints after a step; whether the
        loop ends here."""
        t, settings, step = self.t, self.settings, self.state.step
        # A paused run evaluates when due, as it would have gone on, so that its resumed
        # records are those of an uninterrupted run.
        paused = self.paused()
        last = (self.stopped is not None and not paused) or step >= settings.total_steps
        due = last or (settings.eval_steps and step % settings.eval_steps == 0)
        if (not self.stopped or paused) and due:
            self.eval_metrics = evaluate(t, settings)
            if not all(math.isfinite(v) for v in self.eval_metrics.values()):
                self.watch.settle()  # a poisoned update says so, rather than its evaluation
            if self.eval_metrics:
                self.reporter.record({"step": step, **self.eval_metrics})
                self.write_samples(step)
                stopped, keep_best = self.decide(lambda p: p.on_eval(step, self.eval_metrics))
                self.stopped = stopped or self.stopped
                self.drop_late_pause()
                if keep_best:
                    self.watch.settle()
                    save_best(t, step, self.eval_metrics)
        if self.stopped and not self.stopped[1].save:
            return True
        if t.tasks is not None and t.tasks.due(step, last or self.stopped is not None):
            self.score_tasks(step)
        # One process decides alone, as late as it can; several agreed in the step's sync.
        stop_now = stop_now or (t.dist.world_size == 1 and self.stop_request.requested)
        if self.stopped or last or stop_now or (
                settings.save_steps and step % settings.save_steps == 0):
            self.checkpoint()
        if stop_now and not (self.stopped or last):
            raise Interrupted(_interrupted(t, step, self.checkpointed))
        return self.stopped is not None

    def decide(self, ask: Callable[[StoppingPolicy], Decision]
               ) -> tuple[tuple[str, Decision] | None, bool]:
        """The policies' say (``_decide``), the same on every process (``_agree``)."""
        t = self.t
        stopped, keep_best = _decide(t.policies, ask, self.reporter.warn)
        if t.dist.world_size > 1:
            stopped, keep_best = _agree(t.policies, stopped, keep_best, t.dist, t.device)
        return stopped, keep_best

    def paused(self) -> bool:
        """Whether a policy paused the run (``Decision.resumable``) rather than ending it."""
        return self.stopped is not None and self.stopped[1].resumable

    def drop_late_pause(self) -> None:
        """A pause at the last step is simply the run's end."""
        if self.paused() and self.state.step >= self.settings.total_steps:
            self.stopped = None

    def score_tasks(self, step: int) -> None:
        """``--eval-tasks``: the policy's scores on the lm-eval harness's tasks, as their own
        record in metrics.jsonl (one process: the runs that score them take no --nproc)."""
        t = self.t
        if t.tasks is None:
            return
        was_training = t.policy.training
        try:
            record = t.tasks(strat.unwrap(t.policy), t.tokenizer, t.backend,
                             self.settings.dtype, t.device, step)
        finally:
            t.policy.train(was_training)
        if record:
            self.reporter.record({"step": step, **record})
            shown = [f"{key.removeprefix('eval/tasks/')} {value:.4g}"
                     for key, value in record.items() if not key.endswith("_stderr")]
            self.reporter.info(f"step {step} benchmarks: {', '.join(shown)}")

    def checkpoint(self) -> None:
        """Everything an exact resume needs, once the last update is known finite."""
        t, state = self.t, self.state
        self.watch.settle()
        # Every rank gathers (FSDP's full state is collective); rank 0 alone writes.
        weights = strat.full_state_dict(t.policy, t.dist)
        optimizer_state = strat.optimizer_state(t.policy, t.optimizer, t.dist)
        reference = (None if t.reference_update is None
                     else t.reference_update.state_dict(t.dist))  # collective under FSDP too
        if not t.dist.is_main:
            return
        trainer_state = {"train": state.to_dict(),
                         "policies": {n: plugin_call(p, "state_dict()", p.state_dict)
                                      for n, p in t.policies.items()},
                         "loss": t.objective.state_dict(),
                         "distributed": {"world_size": t.dist.world_size,
                                         "strategy": t.strategy},
                         "config": self.settings.config}
        tensors = {"optimizer": optimizer_state, "scheduler": t.scheduler.state_dict(),
                   "rng": rng_states(t.backend.rng_state())}
        path = save_checkpoint(t.output, state.step, strat.unwrap(t.policy), t.tokenizer,
                               trainer_state, tensors, self.settings.save_total_limit, weights,
                               weight_files=None if reference is None else
                               {REFERENCE_WEIGHTS: reference})
        self.checkpointed.append(path)
        if self.on_save:
            self.on_save(path)

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> Outcome:
        """The final model (the best evaluation's weights where a policy keeps them), unless a
        policy distrusts the weights."""
        t, stopped, paused = self.t, self.stopped, self.paused()
        saved = not (stopped and not stopped[1].save)
        restored_step = None
        if paused:  # the checkpoint of this step is where --resume goes on
            name, decision = stopped
            return Outcome(self.state.step, name, decision.reason, self.train_metrics,
                           self.eval_metrics, saved, self.initial_eval, paused=True)
        if saved and any(p.restores_best() for p in t.policies.values()):
            best = restore_best(t)
            if best is not None:
                restored_step, self.eval_metrics = best
                self.reporter.info(f"final weights: the best evaluation's, from step "
                                   f"{restored_step}")
        if saved:
            self.watch.settle()
            weights = strat.full_state_dict(t.policy, t.dist)  # collective under FSDP
            if t.dist.is_main:
                save_model_dir(t.output / FINAL, strat.unwrap(t.policy), t.tokenizer,
                               state_dict=weights)
        name, decision = stopped if stopped else (None, Decision())
        return Outcome(self.state.step, name, decision.reason, self.train_metrics,
                       self.eval_metrics, saved, self.initial_eval, restored_step)
