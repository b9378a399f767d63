"""Our loss plugins against TRL 1.16's own loss code, on the same random per-pair inputs.

TRL lives in a throwaway virtualenv, never a dependency of this project. Make it once (the time
it took is printed; torch's CPU wheel, so that pip does not pull the CUDA build):

    python benchmarks/trl_losses.py --make-venv .bench/trl-losses

then, from the repository root, with this project's environment:

    python benchmarks/trl_losses.py --trl-python .bench/trl-losses/bin/python
    python benchmarks/trl_losses.py --trl-python ... --json out/trl_losses.json

and as a test (skipped unless the variable names the venv's python):

    DPO_TRL_PYTHON=.bench/trl-losses/bin/python python -m pytest tests/test_trl_agreement.py

How TRL is called, without a model: this file runs itself in the TRL venv (``--trl-side``,
which imports torch and trl only). For each pair it calls

- ``DPOTrainer._compute_loss`` as an unbound function on a namespace that carries the attributes
  it reads (beta, loss_types, loss_weights, label_smoothing, precomputed reference log-probs, an
  accelerator whose gathers are the identity) and a stand-in model whose ``log_probs`` output
  holds l/n at each of the n completion positions (so TRL's sums give l, its token counts n,
  and its SFT token mean l/n). One pair a call: TRL's ``sft`` is a token mean over its batch,
  ours a per-pair loss, and one pair makes the two the same thing.
- ``CPOTrainer.cpo_loss`` (``trl.experimental.cpo``) for SimPO, on the per-token mean log-probs
  TRL's CPO computes for ``loss_type="simpo"``; and with ``loss_type="sigmoid"`` and
  ``label_smoothing=eps`` on the log-ratios r_w, r_l for conservative DPO (TRL 1.16's
  DPOTrainer has no label-smoothed sigmoid any more; this is its code of the same formula);
  and with ``loss_type="sigmoid"`` on the summed policy log-probs for CPO's preference term
  (compared at ``alpha=0``: TRL adds its NLL outside ``cpo_loss``).
- ``ORPOTrainer.odds_ratio_loss`` (``trl.experimental.orpo``) for ORPO's odds-ratio term and log
  odds; the NLL beside it is the chosen completion's per-token mean, which TRL's ORPO takes
  over prompt and completion tokens (ours: completion only), so the total is compared with
  NLL = -l_w/n_w.
- ``KTOTrainer._compute_loss`` (``trl.KTOTrainer``, stable since 1.16) for KTO, batch by batch
  (the KL estimate is a batch quantity): random micro-batches of unpaired examples, each with
  its summed policy and reference log-probs, its label and the summed log-probs of its
  mismatched row (its prompt with another example's completion). Called unbound on a namespace
  with ``calculate_KL``, precomputed ``ref_logps``/``ref_KL_logps``, the weights and beta, TRL's
  own ``_compute_kl_logps``, an identity accelerator, and a stand-in model whose ``log_probs``
  hold each row's sum at one position (the KL rows are told apart by their input ids). Its
  return is the batch mean; each example's own loss is TRL's value for a batch of that example
  alone with the same mismatched rows (so the same KL: TRL's KL rows need not match its
  examples one to one). Its ``kl`` and per-label ``rewards/*``, ``logps/*`` metrics are
  compared too. Ours: ``kl_estimate`` of ``dpo.core.training.unpaired`` on the mismatched rows,
  the plugin on the examples, and the run's per-label metric means. On one process the two KL
  estimates are one formula; over several, TRL averages each process's mean and ours divides
  the sum over all mismatched rows by their count (the same when micro-batches are equal). A
  micro-batch of one example: TRL refuses it, ours uses no mismatched row (KL 0); not compared.

Our side loads every loss through the plugin manager (``--loss NAME`` as a run would) and
skips, saying so, a name in ``CASES`` that is not registered here, so that the table checks
each loss once it is merged. Exit status 1 if a loss differs without a reason given in
``CASES``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
TOLERANCE = 1e-9  # float64 on both sides; relative to max(1, |value|)

# Our loss name -> how TRL 1.16 computes the same thing. ``trainer``: dpo (DPOTrainer loss
# types), cpo (CPOTrainer.cpo_loss), orpo (ORPOTrainer.odds_ratio_loss), kto
# (KTOTrainer._compute_loss, on unpaired micro-batches). ``on_purpose``: why
# ours differs, where it does.
CASES: list[dict] = [
    {"loss": "dpo", "options": {"beta": 0.1}, "trainer": "dpo", "loss_type": ["sigmoid"],
     "trl": {"beta": 0.1}},
    {"loss": "cdpo", "options": {"beta": 0.1, "eps": 0.1}, "trainer": "cpo",
     "loss_type": "sigmoid", "trl": {"beta": 0.1, "label_smoothing": 0.1}, "inputs": "ratios"},
    {"loss": "ipo", "options": {"beta": 0.1, "length_normalize": True}, "trainer": "dpo",
     "loss_type": ["ipo"], "trl": {"beta": 0.1}},
    {"loss": "ipo", "options": {"beta": 0.1, "length_normalize": False}, "trainer": "dpo",
     "loss_type": ["ipo"], "trl": {"beta": 0.1},
     "on_purpose": "summed log-ratios, as the original DPO code; TRL divides each by its "
                   "token count (ours: length_normalize=true, the default)"},
    {"loss": "hinge", "options": {"beta": 0.1}, "trainer": "dpo", "loss_type": ["hinge"],
     "trl": {"beta": 0.1}},
    {"loss": "robust", "options": {"beta": 0.1, "eps": 0.1}, "trainer": "dpo",
     "loss_type": ["robust"], "trl": {"beta": 0.1, "label_smoothing": 0.1}},
    {"loss": "exo", "options": {"beta": 0.1, "eps": 1e-3}, "trainer": "dpo",
     "loss_type": ["exo_pair"], "trl": {"beta": 0.1, "label_smoothing": 1e-3}},
    {"loss": "nca", "options": {"beta": 0.1}, "trainer": "dpo", "loss_type": ["nca_pair"],
     "trl": {"beta": 0.1}},
    {"loss": "bco", "options": {"beta": 0.1}, "trainer": "dpo", "loss_type": ["bco_pair"],
     "trl": {"beta": 0.1}},
    {"loss": "sppo_hard", "options": {"beta": 0.1}, "trainer": "dpo",
     "loss_type": ["sppo_hard"], "trl": {"beta": 0.1}},
    {"loss": "apo_zero", "options": {"beta": 0.1}, "trainer": "dpo", "loss_type": ["apo_zero"],
     "trl": {"beta": 0.1}},
    {"loss": "apo_down", "options": {"beta": 0.1}, "trainer": "dpo", "loss_type": ["apo_down"],
     "trl": {"beta": 0.1}},
    {"loss": "rpo", "options": {"beta": 0.1, "alpha": 1.0}, "trainer": "dpo",
     "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "trl": {"beta": 0.1}},
    {"loss": "sft", "options": {}, "trainer": "dpo", "loss_type": ["sft"], "trl": {"beta": 0.1}},
    {"loss": "simpo", "options": {"beta": 2.0, "gamma": 0.5}, "trainer": "cpo",
     "loss_type": "simpo", "trl": {"beta": 2.0, "simpo_gamma": 0.5}, "inputs": "means"},
    # CPO's preference term on summed log-probs (alpha = 0: TRL adds its NLL, a token mean over
    # the batch, outside cpo_loss; ours is the per-pair token mean of rpo and sft).
    {"loss": "cpo", "options": {"beta": 0.1, "alpha": 0.0}, "trainer": "cpo",
     "loss_type": "sigmoid", "trl": {"beta": 0.1}, "inputs": "sums"},
    # ORPOTrainer.odds_ratio_loss casts the log-probs to float32 first: compared at that
    # precision.
    {"loss": "orpo", "options": {"beta": 0.1}, "trainer": "orpo", "trl": {"beta": 0.1},
     "tolerance": 1e-6},
    # Unpaired examples in micro-batches of 2-8 (``random_batches``), compared per example
    # and per batch (its mean loss, the KL estimate and the per-label metrics).
    {"loss": "kto", "options": {"beta": 0.1}, "trainer": "kto", "loss_type": "kto",
     "trl": {"beta": 0.1}},
    {"loss": "kto", "options": {"beta": 0.5, "desirable_weight": 1.33,
                                "undesirable_weight": 0.8},
     "trainer": "kto", "loss_type": "kto",
     "trl": {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.8}},
    {"loss": "dpop", "options": {}, "trainer": None,
     "none": "TRL 1.16 has no DPO-Positive loss"},
]


# -- the inputs ------------------------------------------------------------------------------

def random_pairs(n: int, seed: int) -> list[dict]:
    """Per pair: summed policy and reference log-probs of both completions and their token
    counts. The first pairs are edge cases: policy == reference, and a completion whose
    per-token probability is close to 1 (ORPO's odds near infinity)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        nw, nl = rng.randint(1, 40), rng.randint(1, 40)
        mw, ml = -rng.uniform(0.01, 4.0), -rng.uniform(0.01, 4.0)
        pw, pl = mw * nw, ml * nl
        rw, rl = pw + rng.gauss(0, 3), pl + rng.gauss(0, 3)
        if i == 0:
            rw, rl = pw, pl
        if i == 1:
            pw = -1e-6 * nw
        pairs.append({"policy_chosen": pw, "policy_rejected": pl, "ref_chosen": rw,
                      "ref_rejected": rl, "chosen_tokens": nw, "rejected_tokens": nl})
    return pairs


def random_batches(n: int, seed: int) -> list[list[dict]]:
    """``n`` (at least 2) unpaired examples in micro-batches of 2 to 9. Per example: summed
    policy and reference log-probs of its completion, its label (True: desirable), and the
    summed policy and reference log-probs of its mismatched row. The first batches are edge
    cases: policy == reference everywhere (the loss is lambda_y / 2), all desirable, all
    undesirable, and a negative KL estimate (clamped at 0)."""
    rng = random.Random(seed)
    batches: list[list[dict]] = []
    left = max(n, 2)
    while left > 0:
        size = min(left, rng.randint(2, 8))
        if left - size == 1:  # no micro-batch of one: it has no mismatched row
            size += 1
        batch = []
        for _ in range(size):
            tokens = rng.randint(1, 40)
            policy = -rng.uniform(0.01, 4.0) * tokens
            mismatched = -rng.uniform(0.5, 6.0) * rng.randint(1, 40)
            batch.append({"policy": policy, "reference": policy + rng.gauss(0, 3),
                          "label": rng.random() < 0.5, "tokens": tokens,
                          "policy_kl": mismatched + rng.gauss(0.5, 2),
                          "reference_kl": mismatched})
        b = len(batches)
        for e in batch:
            if b == 0:
                e["reference"], e["reference_kl"] = e["policy"], e["policy_kl"]
            elif b in (1, 2):
                e["label"] = b == 1
            elif b == 3:
                e["policy_kl"] = e["reference_kl"] - 0.1 - abs(rng.gauss(1, 1))
        batches.append(batch)
        left -= size
    return batches


# -- TRL's side (runs in the TRL venv: torch and trl only) -----------------------------------

def trl_side(in_path: str, out_path: str) -> None:
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    import trl
    from trl import DPOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    torch.set_default_dtype(torch.float64)
    request = json.loads(Path(in_path).read_text())
    pairs, cases = request["pairs"], request["cases"]
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                  gather=lambda x: x, unwrap_model=lambda m: m)

    def dpo_value(case: dict, p: dict) -> float:
        nw, nl = p["chosen_tokens"], p["rejected_tokens"]
        width = 1 + max(nw, nl)
        completion = torch.zeros(2, width, dtype=torch.long)
        log_probs = torch.zeros(2, width - 1)
        for row, (total, count) in enumerate(((p["policy_chosen"], nw),
                                              (p["policy_rejected"], nl))):
            completion[row, 1:1 + count] = 1
            log_probs[row, :count] = total / count
        outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2, width - 1),
                                  mean_logits=torch.zeros(2, width - 1),
                                  is_top1=torch.zeros(2, width - 1, dtype=torch.bool),
                                  aux_loss=None)
        inputs = {"input_ids": torch.zeros(2, width, dtype=torch.long),
                  "attention_mask": torch.ones(2, width, dtype=torch.long),
                  "completion_mask": completion,
                  "ref_chosen_logps": torch.tensor([p["ref_chosen"]]),
                  "ref_rejected_logps": torch.tensor([p["ref_rejected"]])}
        types = case["loss_type"]
        model = SimpleNamespace(training=True)
        this = SimpleNamespace(
            model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=types,
            loss_weights=case.get("loss_weights") or [1.0] * len(types),
            beta=case["trl"]["beta"], label_smoothing=case["trl"].get("label_smoothing", 0.0),
            use_weighting=False, args=SimpleNamespace(discopop_tau=0.05),
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
            ref_model=None)
        loss = DPOTrainer._compute_loss(this, lambda **kwargs: outputs, inputs, False)
        return float(loss)

    def cpo_value(case: dict, p: dict) -> float:
        if case.get("inputs") == "ratios":
            chosen = p["policy_chosen"] - p["ref_chosen"]
            rejected = p["policy_rejected"] - p["ref_rejected"]
        elif case.get("inputs") == "sums":
            chosen, rejected = p["policy_chosen"], p["policy_rejected"]
        else:
            chosen = p["policy_chosen"] / p["chosen_tokens"]
            rejected = p["policy_rejected"] / p["rejected_tokens"]
        this = SimpleNamespace(accelerator=accelerator, alpha=0.0, beta=case["trl"]["beta"],
                               loss_type=case["loss_type"],
                               simpo_gamma=case["trl"].get("simpo_gamma", 0.0),
                               label_smoothing=case["trl"].get("label_smoothing", 0.0))
        losses, _, _ = CPOTrainer.cpo_loss(this, torch.tensor([chosen]), torch.tensor([rejected]))
        return float(losses[0])

    def orpo_value(case: dict, p: dict) -> dict:
        chosen = p["policy_chosen"] / p["chosen_tokens"]
        rejected = p["policy_rejected"] / p["rejected_tokens"]
        this = SimpleNamespace(accelerator=accelerator, beta=case["trl"]["beta"])
        losses, _, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
            this, torch.tensor([chosen]), torch.tensor([rejected]))
        # ORPOTrainer: loss = nll - losses.mean(); the NLL with completion tokens only here.
        return {"loss": -chosen - float(losses[0]), "log_odds_ratio": float(ratio),
                "log_odds_chosen": float(log_odds)}

    def kto_values(case: dict, batch: list[dict]) -> list[dict]:
        """Each example's loss (TRL on that example alone, with the batch's mismatched rows),
        then the batch's mean loss and metrics."""
        from trl import KTOTrainer

        def call(examples: list[dict]) -> tuple[float, dict]:
            b, m = len(examples), len(batch)

            def model(input_ids, **kwargs):
                # KL rows carry input ids 1, the examples' rows 0; each row's sum at position 0.
                rows = batch if int(input_ids[0, 0]) == 1 else examples
                key = "policy_kl" if int(input_ids[0, 0]) == 1 else "policy"
                log_probs = torch.zeros(len(rows), 1)
                log_probs[:, 0] = torch.tensor([e[key] for e in rows])
                return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(len(rows), 1),
                                       mean_logits=torch.zeros(len(rows), 1), aux_loss=None)

            inputs = {"input_ids": torch.zeros(b, 2, dtype=torch.long),
                      "attention_mask": torch.ones(b, 2, dtype=torch.long),
                      "completion_mask": torch.ones(b, 2, dtype=torch.long),
                      "KL_input_ids": torch.ones(m, 2, dtype=torch.long),
                      "KL_attention_mask": torch.ones(m, 2, dtype=torch.long),
                      "KL_completion_mask": torch.ones(m, 2, dtype=torch.long),
                      "label": torch.tensor([e["label"] for e in examples]),
                      "ref_logps": torch.tensor([e["reference"] for e in examples]),
                      "ref_KL_logps": torch.tensor([e["reference_kl"] for e in batch])}
            this = SimpleNamespace(
                model=SimpleNamespace(training=True), accelerator=accelerator,
                aux_loss_enabled=False, calculate_KL=True, precompute_ref_logps=True,
                loss_type=case["loss_type"], beta=case["trl"]["beta"],
                desirable_weight=case["trl"].get("desirable_weight", 1.0),
                undesirable_weight=case["trl"].get("undesirable_weight", 1.0),
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                _tp_size=1, ref_model=None)
            this._compute_kl_logps = lambda m_, b_: KTOTrainer._compute_kl_logps(this, m_, b_)
            loss = KTOTrainer._compute_loss(this, model, inputs, False)
            return float(loss), {k: v[-1] for k, v in this._metrics["train"].items()}

        values = [{"loss": call([e])[0]} for e in batch]
        mean, metrics = call(batch)
        summary = {"batch_loss": mean}
        for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                     "logps/chosen", "logps/rejected"):
            if name in metrics:
                summary[name] = float(metrics[name])
        return values + [summary]

    results = {}
    for key, case in cases.items():
        if case["trainer"] == "dpo":
            results[key] = [{"loss": dpo_value(case, p)} for p in pairs]
        elif case["trainer"] == "cpo":
            results[key] = [{"loss": cpo_value(case, p)} for p in pairs]
        elif case["trainer"] == "orpo":
            results[key] = [orpo_value(case, p) for p in pairs]
        elif case["trainer"] == "kto":
            results[key] = [v for batch in request["batches"] for v in kto_values(case, batch)]
    Path(out_path).write_text(json.dumps({"trl": trl.__version__, "torch": torch.__version__,
                                          "values": results}))


# -- our side (this project's environment) ---------------------------------------------------

def case_key(index: int, case: dict) -> str:
    return f"{index}:{case['loss']}"


def our_loss(case: dict, catalog):
    """The registered loss of ``case`` with its options, or None and why it is skipped (not
    registered here, options refused)."""
    from dpo.core.interfaces.errors import UsageError

    if case["loss"] not in catalog.losses.names():
        return None, "skipped: not registered here"
    cls = catalog.losses.get(case["loss"])
    try:
        return cls(cls.parse_options(case["options"])), ""
    except UsageError as e:
        return None, f"skipped: {e}"


def our_values(case: dict, pairs: list[dict], catalog) -> tuple[list[dict] | None, str]:
    """Our per-pair values, or None and why (not registered, options refused)."""
    import torch

    from dpo.core.interfaces.loss import PairLogps

    loss, why = our_loss(case, catalog)
    if loss is None:
        return None, why

    def column(key: str, dtype=torch.float64):
        return torch.tensor([p[key] for p in pairs], dtype=dtype)

    out = loss(PairLogps(
        policy_chosen=column("policy_chosen"), policy_rejected=column("policy_rejected"),
        chosen_tokens=column("chosen_tokens", torch.long),
        rejected_tokens=column("rejected_tokens", torch.long),
        ref_chosen=column("ref_chosen") if loss.requires_reference else None,
        ref_rejected=column("ref_rejected") if loss.requires_reference else None))
    values = [{"loss": float(v)} for v in out.losses.detach()]
    for name in ("log_odds_ratio", "log_odds_chosen"):
        if name in out.metrics:
            for row, v in zip(values, out.metrics[name]):
                row[name] = float(v)
    return values, ""


def our_unpaired_values(case: dict, batches: list[list[dict]], catalog
                        ) -> tuple[list[dict] | None, str]:
    """Per batch: each example's loss, then the batch's mean loss, the KL estimate the loss
    used (z_ref, float64) and the per-label metric means as a run logs them."""
    import torch

    from dpo.core.interfaces.loss import UnpairedLogps
    from dpo.core.training.unpaired import kl_estimate, per_label, unpaired_metric_sums

    loss, why = our_loss(case, catalog)
    if loss is None:
        return None, why
    values: list[dict] = []
    for batch in batches:
        def column(key: str, dtype=torch.float64):
            return torch.tensor([e[key] for e in batch], dtype=dtype)

        kl = kl_estimate(column("policy_kl"), column("reference_kl"))
        logps = UnpairedLogps(policy=column("policy"), labels=column("label", torch.bool),
                              tokens=column("tokens", torch.long), kl=kl,
                              reference=column("reference"))
        out = loss(logps)
        values += [{"loss": float(v)} for v in out.losses.detach()]
        n = len(batch)
        metrics = per_label({k: float(v) / n
                             for k, v in unpaired_metric_sums(out, logps).items()})
        summary = {"batch_loss": metrics.pop("loss"), "kl": float(kl.clamp(min=0))}
        summary.update({k: metrics[k] for k in ("rewards/chosen", "rewards/rejected",
                                                "rewards/margins", "logps/chosen",
                                                "logps/rejected") if k in metrics})
        values.append(summary)
    return values, ""


def run_trl(trl_python: str, pairs: list[dict], cases: dict,
            batches: list[list[dict]] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = Path(tmp) / "in.json", Path(tmp) / "out.json"
        request.write_text(json.dumps({"pairs": pairs, "cases": cases,
                                       "batches": batches or []}))
        done = subprocess.run([trl_python, __file__, "--trl-side", str(request), str(answer)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the TRL side failed ({trl_python}):\n{done.stderr[-4000:]}")
        return json.loads(answer.read_text())


def compare(trl_python: str, n: int = 64, seed: int = 0) -> dict:
    """Every case of ``CASES`` on ``n`` random pairs; returns the rows of the table."""
    from dpo.core.interfaces.plugins import collect, get_plugin_manager

    catalog = collect(get_plugin_manager(load_entrypoints=False))
    pairs = random_pairs(n, seed)
    batches = random_batches(n, seed)
    with_trl = {case_key(i, c): c for i, c in enumerate(CASES) if c["trainer"]}
    trl = run_trl(trl_python, pairs, with_trl, batches)
    rows = []
    for i, case in enumerate(CASES):
        row = {"loss": case["loss"], "options": case["options"],
               "trl": (f"{case['trainer']}:{'+'.join(case['loss_type'])}"
                       if isinstance(case.get("loss_type"), list)
                       else f"{case['trainer']}:{case.get('loss_type', 'odds_ratio')}"
                       if case["trainer"] else "-"),
               "max_abs_diff": None}
        if not case["trainer"]:
            row["status"] = f"no counterpart: {case['none']}"
            rows.append(row)
            continue
        ours, why = (our_unpaired_values(case, batches, catalog) if case["trainer"] == "kto"
                     else our_values(case, pairs, catalog))
        if ours is None:
            row["status"] = why
            rows.append(row)
            continue
        theirs = trl["values"][case_key(i, case)]
        worst, scaled = 0.0, 0.0
        if len(ours) != len(theirs):  # pragma: no cover - the two sides read the same inputs
            raise SystemExit(f"{case['loss']}: {len(ours)} values here, {len(theirs)} from TRL")
        missing = set()
        for mine, other in zip(ours, theirs):
            missing |= set(other) - set(mine)
            for name, value in other.items():
                if name in mine:
                    d = abs(mine[name] - value)
                    worst = max(worst, d)
                    scaled = max(scaled, d / max(1.0, abs(value)))
        row["max_abs_diff"] = worst
        row["max_rel_diff"] = scaled
        agree = (not missing and scaled <= case.get("tolerance", TOLERANCE)
                 and all(math.isfinite(v) for r in ours for v in r.values()))
        if agree:
            row["status"] = "agrees"
        elif case.get("on_purpose"):
            row["status"] = f"differs on purpose: {case['on_purpose']}"
        else:
            row["status"] = "DIFFERS" + (f" (not computed here: {sorted(missing)})"
                                         if missing else "")
        rows.append(row)
    return {"pairs": n, "batches": len(batches), "seed": seed, "trl": trl["trl"],
            "trl_torch": trl["torch"], "rows": rows}


def show(result: dict) -> None:
    print(f"TRL {result['trl']} (torch {result['trl_torch']}), {result['pairs']} random pairs "
          f"(seed {result['seed']}), float64; unpaired losses: as many examples in "
          f"{result['batches']} micro-batches")
    print("| loss | options | TRL 1.16 | max abs diff | max rel diff | result |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        rel = "-" if r.get("max_rel_diff") is None else f"{r['max_rel_diff']:.2e}"
        print(f"| {r['loss']} | {options} | {r['trl']} | {diff} | {rel} | {r['status']} |")


def make_venv(path: Path) -> None:
    """A virtualenv with torch's CPU wheel and TRL, timed."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # torch's own CPU index first (PyPI's Linux wheel pulls several GB of CUDA libraries);
    # where that index cannot be reached, whatever pip is configured with.
    cpu = subprocess.run([*pip, "--retries", "0", "--timeout", "20", "--index-url",
                          "https://download.pytorch.org/whl/cpu", f"torch=={TORCH_VERSION}"])
    if cpu.returncode != 0:
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}"], check=True)
    seconds = time.perf_counter() - started
    print(f"{path}: torch {TORCH_VERSION} and trl {TRL_VERSION} in {seconds:.0f} s; "
          f"run: python {Path(__file__).name} --trl-python {path / 'bin' / 'python'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-venv", type=Path, help="create the TRL virtualenv here and exit")
    parser.add_argument("--trl-python", default=os.environ.get("DPO_TRL_PYTHON"),
                        help="the TRL virtualenv's python (default: $DPO_TRL_PYTHON)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--trl-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_side:
        trl_side(*args.trl_side)
        return 0
    if args.make_venv:
        make_venv(args.make_venv)
        return 0
    if not args.trl_python:
        parser.error("give --trl-python (or DPO_TRL_PYTHON), made with --make-venv DIR")
    result = compare(args.trl_python, args.pairs, args.seed)
    show(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if any(r["status"].startswith("DIFFERS") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
