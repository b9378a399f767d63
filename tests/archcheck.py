"""One DPO step of a tiny model, computed naively and by dpo on given speed paths, compared.

Not a test module: ``test_architectures.py`` runs it on every architecture of ``zoo.py``.
``python tests/archcheck.py [TYPE ...] > probe.jsonl`` probes each speed path on its own (with
what it builds on), whatever ``dpo.core.model.verified`` says, one JSON line per variant, and
``python tests/archcheck.py --suggest < probe.jsonl`` turns those lines into the entries of
``dpo.core.model.verified`` they support: how the table was written, and how to add a type (about
8 minutes for every type on 2 cores).

The naive step is the textbook one: each sequence alone through the model's own forward (no
padding, no batching), in eval mode, full logits, log-softmax, the completion tokens'
log-probs summed, DPO's loss (Rafailov et al. 2023, Eq. 7) against reference log-probs, backward.
dpo's step is the loop's own code (``pair_logps`` on a collated batch, the ``dpo`` loss plugin)
on the paths given, the model in training mode with ``disable_dropout`` applied, as a run has
it. Both use the same reference log-probs (the naive ones, each shifted by a different amount,
so that the loss is away from ln 2 and every pair weighs differently in the gradient).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

from dpo.backends.cpu import CPUBackend  # noqa: E402
from dpo.core.model import paths as speed  # noqa: E402
from dpo.core.data.batching import Batch, collate  # noqa: E402
from dpo.core.model.dropout import disable_dropout  # noqa: E402
from dpo.core.training.objectives import pair_logps  # noqa: E402
from dpo.core.model.paths import PLAIN, Paths  # noqa: E402
from dpo.core.data.tokenization import TokenizedPair  # noqa: E402
from dpo.plugins.losses.dpo import DPOLoss  # noqa: E402

# (prompt, chosen, rejected) lengths, with EOS-free random tokens: prompts of different
# lengths (so shared-prompt groups put completions past their positions in the cache), two
# equal prompts, completions longer on either side; 13 tokens at most, so a window of
# zoo.WINDOW = 4 tokens bites everywhere.
SHAPES = [(3, 5, 2), (7, 3, 6), (5, 4, 4), (7, 2, 5)]
OFFSETS = [0.3, -0.2, 0.5, -0.4, 0.1, 0.25, -0.35, 0.45]  # reference shifts, per row
BETA = 0.1

# Agreement of two exact computations on these tiny float32 models: log-probs (about -20 to
# -60 nats) and the loss to 1e-4; every gradient to 1e-3 of its tensor's largest entry, or of
# GRAD_FLOOR times the model's largest where that is more (a gradient that is 0 in exact
# arithmetic, as a key projection's bias under softmax, is float noise either way).
LOGPS_ATOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_FLOOR = 1e-2

MODES = ("plain", "padded", "shared", "checkpointed", "packed")


@dataclass
class Step:
    logps: torch.Tensor  # [2B]: chosen rows, then rejected
    loss: torch.Tensor  # [B]
    grads: dict[str, torch.Tensor]


def make_pairs(model: torch.nn.Module, seed: int = 0) -> tuple[list[TokenizedPair], int]:
    """The test pairs (random ordinary tokens of the model) and a padding id (an ordinary
    token too: masked out, but some models treat special ids specially wherever they are)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt, chosen, rejected in SHAPES:
        ids = zoo.token_ids(model, prompt + chosen + rejected, generator).tolist()
        pairs.append(TokenizedPair(tuple(ids[:prompt]), tuple(ids[prompt:prompt + chosen]),
                                   tuple(ids[prompt + chosen:])))
    return pairs, int(zoo.token_ids(model, 1, generator)[0])


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _dpo(chosen, rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    return -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def naive_step(model: torch.nn.Module, pairs: list[TokenizedPair]) -> tuple[Step, torch.Tensor]:
    """The naive step, and the reference log-probs both steps use."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    rows = ([(p.prompt_ids, p.chosen_ids) for p in pairs]
            + [(p.prompt_ids, p.rejected_ids) for p in pairs])
    logps = []
    for prompt, completion in rows:
        ids = torch.tensor([[*prompt, *completion]])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        token = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        logps.append(token[len(prompt) - 1:].sum())
    logps = torch.stack(logps)
    ref = logps.detach() + torch.tensor(OFFSETS[:len(rows)])
    b = len(pairs)
    loss = _dpo(logps[:b], logps[b:], ref[:b], ref[b:])
    loss.sum().backward()
    model.train(was_training)
    return Step(logps.detach(), loss.detach(), _grads(model)), ref


def our_step(model: torch.nn.Module, batch: Batch, paths: Paths) -> Step:
    """The loop's computation of the step on ``paths`` (``batch`` carries the reference)."""
    model.zero_grad(set_to_none=True)
    loss_fn = DPOLoss(DPOLoss.parse_options({"beta": BETA}))
    logps = pair_logps(model, None, batch, CPUBackend(), torch.float32, paths)
    out = loss_fn(logps)
    out.losses.sum().backward()
    both = torch.cat([logps.policy_chosen, logps.policy_rejected]).detach()
    return Step(both, out.losses.detach(), _grads(model))


def difference(got: Step, want: Step) -> tuple[float, float, str | None]:
    """(largest log-prob or loss difference, largest relative gradient difference, the worst
    parameter's name)."""
    values = max(float((got.logps - want.logps).abs().max()),
                 float((got.loss - want.loss).abs().max()))
    if not math.isfinite(values):
        return math.inf, math.inf, None
    worst, name = 0.0, None
    largest = max((float(g.abs().max()) for g in want.grads.values()), default=0.0)
    for key, g in want.grads.items():
        mine = got.grads.get(key, torch.zeros_like(g))
        scale = max(float(g.abs().max()), GRAD_FLOOR * largest) + 1e-12
        rel = float((mine - g).abs().max()) / scale
        if rel > worst:
            worst, name = rel, key
    for key in got.grads.keys() - want.grads.keys():  # a gradient where naive has none
        if float(got.grads[key].abs().max()) > 0:
            return values, math.inf, key
    return values, worst, name


def exact(got: Step, want: Step) -> bool:
    values, grads, _ = difference(got, want)
    return values <= LOGPS_ATOL and grads <= GRAD_RTOL


# -- preparing the model for a mode ----------------------------------------------------------

VARLEN_NAME = "dpo_test_varlen"


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, **kwargs):
    """A stand-in variable-length kernel with flash-attention's contract: given cumulative
    lengths (``cu_seq_lens_q``), it attends within each sequence they mark; without them, within
    each row, hiding the keys a 2-D padding mask marks; causally either way, honouring a
    sliding window and a soft cap as flash-attention does."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cu = kwargs.get("cu_seq_lens_q")
    n = query.shape[2]
    bounds = cu.tolist() if cu is not None else [0, n]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        scores = (q @ k.transpose(-1, -2)).float() * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(b - a)
        allowed = (i[None, :] <= i[:, None])[None, None]
        if sliding_window:
            allowed = allowed & (i[:, None] - i[None, :] < sliding_window)[None, None]
        if cu is None and attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, a:b].bool()
        scores = scores.masked_fill(~allowed, float("-inf"))
        parts.append(torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype) @ v)
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_NAME, _varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_NAME, flash_attention_mask)


@contextlib.contextmanager
def varlen_known():
    """``VARLEN_ATTENTION`` names the stand-in kernel for a while."""
    saved = list(speed.VARLEN_ATTENTION)
    speed.VARLEN_ATTENTION.append(VARLEN_NAME)
    try:
        yield
    finally:
        speed.VARLEN_ATTENTION[:] = saved


def _copy(model: torch.nn.Module, rebuild) -> torch.nn.Module:
    """A copy to change: ``rebuild()`` (the same seed: the same weights) where given, since a
    model that keeps tensors of its last forward cannot be deep-copied."""
    return rebuild() if rebuild is not None else copy.deepcopy(model)


def prepare(model: torch.nn.Module, mode: str, rebuild=None
            ) -> tuple[torch.nn.Module | None, Paths, str]:
    """(the model as a run in ``mode`` has it, its paths as the run resolves them, a note);
    model None where the mode cannot run this model (the note says why)."""
    if mode == "plain":
        return model, PLAIN, ""
    if mode == "padded":
        return model, speed.resolve(model), ""
    if mode == "shared":
        return model, speed.resolve(model, share_prompt_default=True), ""
    if mode == "checkpointed":
        from dpo.core.model.activations import checkpoint_layers

        paths = speed.resolve(model, share_prompt_default=True, gradient_checkpointing=True)
        copied = _copy(model, rebuild)
        if paths.layer_checkpointing:
            checkpoint_layers(copied)
            return copied, paths, ""
        if not getattr(copied, "supports_gradient_checkpointing", False):
            return None, paths, "supports no activation checkpointing (a run refuses it)"
        kwargs = {"use_reentrant": False}  # as a run does; transformers renamed it (5.24)
        if hasattr(copied, "activation_checkpointing_enable"):
            copied.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            copied.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return copied, paths, "transformers' own checkpointing"
    if mode == "packed":
        copied = _copy(model, rebuild)
        try:
            copied.set_attn_implementation(VARLEN_NAME)
        except Exception as exc:  # noqa: BLE001 - the model refuses a custom kernel
            return None, PLAIN, f"takes no custom attention kernel ({zoo._first_line(exc)})"
        paths = speed.resolve(copied)
        if not paths.packed_rows:
            # The stand-in kernel is not flash-attention (no attention sinks, for one): what the
            # other paths do under a real one, the other modes show under sdpa.
            return None, paths, f"rows not packed ({paths.reasons().get('packed_rows')})"
        return copied, paths, ""
    raise ValueError(mode)


def run_mode(model: torch.nn.Module, pairs: list[TokenizedPair], pad: int, ref: torch.Tensor,
             mode: str, paths: Paths | None = None, rebuild=None
             ) -> tuple[Step | None, Paths, str]:
    """dpo's step in ``mode`` (``paths``: these instead of the resolved ones; ``rebuild``: makes
    the same model afresh, for the modes that change a copy)."""
    with varlen_known():
        prepared, resolved, note = prepare(model, mode, rebuild)
    if prepared is None:
        return None, resolved, note
    paths = resolved if paths is None else paths
    batch = dataclasses.replace(collate(pairs, pad), ref_logps=ref)
    prepared.train()
    with varlen_known():
        step = our_step(prepared, batch, paths)
    return step, paths, note


def built(variant: zoo.Variant) -> tuple[torch.nn.Module | None, str | None]:
    model, reason = zoo.build(variant)
    if model is not None:
        disable_dropout(model)
    return model, reason


def rebuilder(variant: zoo.Variant):
    return lambda: built(variant)[0]


# -- probing every path on its own (to write dpo.core.model.verified) -----------------------------

def _closure(name: str) -> dict[str, bool]:
    on = {name: True}
    for need in speed.NEEDS.get(name, ()):
        on.update(_closure(need))
    return on


def window_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Config attributes (of the config or its text config) whose names say attention window."""
    names = set()
    for part in (model.config, getattr(model.config, "text_config", None)):
        if part is None:
            continue
        for name, value in vars(part).items():
            if (name.startswith("_") or "pattern" in name  # every n-th layer, not a width
                    or not any(w in name for w in zoo.WINDOW_FIELDS)):
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, int) and not isinstance(v, bool) for v in values):
                names.add(name)
    return tuple(sorted(names))


def probe(variant: zoo.Variant) -> dict[str, str]:
    """For each speed path alone (with what it needs): "exact", or why not."""
    register_varlen()
    model, reason = built(variant)
    if model is None:
        return {"build": reason}
    pairs, pad = make_pairs(model)
    try:
        want, ref = naive_step(model, pairs)
        plain, _, _ = run_mode(model, pairs, pad, ref, "plain")
    except Exception as exc:  # noqa: BLE001
        return {"naive": f"raises {type(exc).__name__}: {zoo._first_line(exc)}"}
    values, grads, where = difference(plain, want)
    if values > LOGPS_ATOL or grads > GRAD_RTOL:
        return {"plain": f"differs: values {values:.2g}, gradients {grads:.2g} ({where})"}
    found = {}
    window = speed.attention_window(model.config, window_names(model))
    for name in speed.SPEED_PATHS:
        if name == "layer_checkpointing":
            # alone, and with the shared prompt where that is exact: a run combines the two
            mode, paths = "checkpointed", Paths(layer_checkpointing=True)
        elif name == "packed_rows":
            mode, paths = "packed", Paths(**_closure(name))
        else:
            mode, paths = "padded", Paths(window=window, **_closure(name))
        if name == "tied_buffer" and not _tied(model):
            found[name] = "n/a (untied)"
            continue
        try:
            if name == "layer_checkpointing":
                from dpo.core.model.activations import checkpoint_layers

                copied = _copy(model, rebuilder(variant))
                if not checkpoint_layers(copied):
                    found[name] = "no decoder layers"
                    continue
                batch = dataclasses.replace(collate(pairs, pad), ref_logps=ref)
                copied.train()
                got = our_step(copied, batch, paths)
                if found.get("shared_prompt") == "exact" and exact(got, want):
                    got = our_step(copied, batch, Paths(layer_checkpointing=True, window=window,
                                                        **_closure("shared_prompt")))
            else:
                got, _, note = run_mode(model, pairs, pad, ref, mode, paths, rebuilder(variant))
                if got is None:
                    found[name] = note
                    continue
        except Exception as exc:  # noqa: BLE001
            found[name] = f"raises {type(exc).__name__}: {zoo._first_line(exc)}"
            continue
        values, grads, where = difference(got, want)
        found[name] = ("exact" if values <= LOGPS_ATOL and grads <= GRAD_RTOL
                       else f"differs: values {values:.2g}, gradients {grads:.2g} ({where})")
    return found


def _tied(model: torch.nn.Module) -> bool:
    from dpo.core.model.logps import TiedGradient

    return TiedGradient.applies(model)


def suggest(results: list[tuple[zoo.Variant, dict[str, str], tuple[str, ...]]]) -> str:
    """``dpo.core.model.verified`` entries from probe results: a path is listed for a type when it is
    exact in some variant of the type and wrong in none (where a logit- or embedding-scaling
    variant alone fails the head's paths or the tied buffer, they are listed with its
    attributes' neutral values instead)."""
    from dpo.core.model.verified import ALL

    by_type: dict[str, list] = {}
    for variant, found, windows in results:
        by_type.setdefault(variant.model_type, []).append((variant, found, windows))
    lines = []
    head_paths = {"chunked_head", "tied_buffer", "shared_prompt", "packed_rows"}
    for model_type, rows in sorted(by_type.items()):
        if any(set(found) & {"build", "naive", "plain"} for _, found, _ in rows):
            why = next(v for _, f, _ in rows for k, v in f.items() if k in {"build", "naive", "plain"})
            lines.append(f"    # {model_type}: {why}")
            continue
        # a path is listed where it was exact in some variant and wrong in none (tied_buffer
        # "n/a" in every variant of a type that is never tied: not listed, never tried)
        good, head, embedding, tried = set(ALL), [], [], set()

        def wrong(found):
            return {p for p, v in found.items() if v != "exact" and not v.startswith("n/a")}

        base_bad = set().union(*(wrong(f) for v, f, _ in rows
                                 if not (v.logit_scale or v.embed_scale)))
        for variant, found, _ in rows:
            bad = wrong(found) - base_bad  # what the scaling variants break beyond the base
            tried |= {p for p, v in found.items() if v == "exact"}
            good -= base_bad
            if variant.logit_scale and bad and bad <= head_paths:
                head = [(n, zoo.neutral(n)) for n in zoo.scaling_fields(model_type, "logit_scale")]
                continue
            if variant.embed_scale and bad == {"tied_buffer"}:
                embedding = [(n, zoo.neutral(n))
                             for n in zoo.scaling_fields(model_type, "embed_scale")]
                continue
            good -= bad
        good &= tried
        for name, needs in speed.NEEDS.items():  # what a path builds on must be there too
            if not set(needs) <= good:
                good.discard(name)
        windows = sorted({w for _, _, ws in rows for w in ws if "pattern" not in w})
        missing = [p for p in speed.SPEED_PATHS if p not in good]
        if not missing:
            paths = "ALL"
        elif len(missing) <= 3:
            paths = "ALL - {" + ", ".join(f'"{p}"' for p in missing) + "}"
        else:
            paths = "frozenset({" + ", ".join(f'"{p}"' for p in speed.SPEED_PATHS
                                              if p in good) + "})"
        extra = ""
        if windows and "shared_prompt" in good:
            extra += f", window={tuple(windows)!r}"
        if head and good & head_paths:
            extra += f", neutral_head={tuple(head)!r}"
        if embedding and "tied_buffer" in good:
            extra += f", neutral_embedding={tuple(embedding)!r}"
        lines.append(f'    "{model_type}": Arch({paths}{extra}),')
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    args = sys.argv[1:]
    if args and args[0] == "--suggest":  # read probe lines (JSON) from stdin
        results = []
        for line in sys.stdin:
            row = json.loads(line)
            results.append((zoo.Variant(**row["variant"]), row["found"], tuple(row["window"])))
        print(suggest(results))
        sys.exit(0)
    for model_type in args or zoo.causal_lm_types():
        for variant in zoo.variants(model_type):
            found = probe(variant)
            model, _ = zoo.build(variant) if "build" not in found else (None, None)
            windows = window_names(model) if model is not None else ()
            print(json.dumps({"variant": dataclasses.asdict(variant), "found": found,
                              "window": windows}), flush=True)
