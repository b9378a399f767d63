"""Losses trained together (``--loss dpo --loss ipo -o weights=...``): the combination's math on
the object level (golden values derived by hand in each docstring), and runs of the tiny model
through the command line: per-part metrics, the record, the config-file form and the one-line
errors. A reference-free test loss (``nll``) stands for an NLL term."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.training.combination import Combination, loss_label, options_record, resolve_loss
from dpo.core.training.plugin_calls import PluginError
from dpo.plugins.losses.dpo import DPOLoss
from dpo.plugins.losses.ipo import IPOLoss
from dpo.testing import CrashAt, command_line, plugin_of

LN2 = 0.6931471805599453


class NllLoss(Loss):
    """Test-only reference-free loss: the chosen completion's per-token mean NLL, -l_w/n_w.
    Rewards: the per-token mean log-probs of each side (no reference to compare with)."""

    name = "nll"
    requires_reference = False

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen = logps.policy_chosen / logps.chosen_tokens.to(logps.policy_chosen.dtype)
        rejected = logps.policy_rejected / logps.rejected_tokens.to(logps.policy_rejected.dtype)
        return LossOutput(losses=-chosen, chosen_rewards=chosen.detach(),
                          rejected_rewards=rejected.detach(),
                          metrics={"nll/tokens": logps.chosen_tokens.float()})


def one_pair(grad: bool = True) -> PairLogps:
    """l_w = -1, l^ref_w = -2, l_l = -3, l^ref_l = -2, n_w = 2, n_l = 1 (float64): r_w = 1,
    r_l = -1, h = 2."""
    def t(v: float, g: bool = False) -> torch.Tensor:
        return torch.tensor([v], dtype=torch.float64, requires_grad=g)

    return PairLogps(policy_chosen=t(-1.0, grad), policy_rejected=t(-3.0, grad),
                     chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([1]),
                     ref_chosen=t(-2.0), ref_rejected=t(-2.0))


# -- the object ----------------------------------------------------------------------------

def test_value_and_gradient_are_the_weighted_sum():
    """dpo (beta 0.5) x1.0 + ipo (beta 0.5, summed log-probs) x0.25 at r_w = 1, r_l = -1, h = 2.
    L_dpo = -log sigma(0.5 * 2) = log(1 + e^-1) = 0.31326168751822286.
    L_ipo = (h - 1/(2 * 0.5))^2 = (2 - 1)^2 = 1.
    L = 1.0 * 0.31326168751822286 + 0.25 * 1 = 0.56326168751822286.
    dL_dpo/dl_w = -beta (1 - sigma(beta h)) = -0.5 * (1 - 0.7310585786300049)
                = -0.13447071068499755; dL_dpo/dl_l = +0.13447071068499755.
    dL_ipo/dl_w = 2 (h - 1) = 2; dL_ipo/dl_l = -2.
    dL/dl_w = -0.13447071068499755 + 0.25 * 2 = 0.36552928931500245; dL/dl_l = -0.36552928931500245.
    Metrics: loss/dpo = 0.31326..., loss/ipo = 1 (unweighted); rewards: dpo's (the first part
    with a reference), 0.5 * 1 = 0.5 and 0.5 * (-1) = -0.5."""
    loss = Combination({"dpo": DPOLoss(beta=0.5),
                        "ipo": IPOLoss(beta=0.5, length_normalize=False)}, [1.0, 0.25])
    logps = one_pair()
    out = loss(logps)
    assert out.losses.item() == pytest.approx(0.56326168751822286, abs=1e-12)
    out.loss.backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(0.36552928931500245, abs=1e-12)
    assert logps.policy_rejected.grad.item() == pytest.approx(-0.36552928931500245, abs=1e-12)
    assert out.metrics["loss/dpo"].item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert out.metrics["loss/ipo"].item() == pytest.approx(1.0, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (0.5, -0.5)
    assert loss.name == "dpo+ipo" and loss.requires_reference
    assert loss_label(loss) == "dpo (x1.0) + ipo (x0.25)"


def test_rewards_are_the_first_reference_part_s_and_the_parts_keep_their_metrics():
    """nll first, then ipo (beta 0.25): the rewards are ipo's, 0.25 * r_w = 0.25 and
    0.25 * r_l = -0.25, not nll's -l_w/n_w; the combination needs a reference because ipo does.
    nll's own metric stays under its name (nll/tokens = n_w = 2). Default weights 1, 1:
    L = -l_w/n_w + (h - 1/(2 * 0.25))^2 = 0.5 + (2 - 2)^2 = 0.5."""
    loss = Combination({"nll": NllLoss(), "ipo": IPOLoss(beta=0.25, length_normalize=False)})
    out = loss(one_pair())
    assert loss.requires_reference and loss.primary == "ipo"
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (0.25, -0.25)
    assert out.losses.item() == pytest.approx(0.5, abs=1e-12)
    assert out.metrics["nll/tokens"].item() == 2.0
    assert set(out.metrics) == {"nll/tokens", "loss/nll", "loss/ipo"}


def test_a_metric_two_parts_report_goes_under_each_part_s_name():
    class Other(NllLoss):
        name = "other"

    out = Combination({"nll": NllLoss(), "other": Other()})(one_pair())
    assert {"nll/nll/tokens", "other/nll/tokens"} <= set(out.metrics)
    assert "nll/tokens" not in out.metrics


class Counting(DPOLoss):
    """Test-only loss with state: DPO that counts the steps it was told of."""

    name = "counting"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def on_step(self, step, metrics):
        self.seen.append(step)

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state.get("seen", []))


def test_state_goes_to_the_parts_keyed_by_name():
    """The counting part's state travels under its name; dpo keeps none (so it has no key).
    on_step reaches the part; a fresh combination loads it back; state for a name that is no
    part, or for a part that keeps none, is refused."""
    loss = Combination({"dpo": DPOLoss(), "counting": Counting()})
    assert loss.state_dict() == {"counting": {"seen": []}}
    loss.on_step(1, {"loss": 1.0})
    loss.on_step(2, {"loss": 0.9})
    assert loss.state_dict() == {"counting": {"seen": [1, 2]}}
    fresh = Combination({"dpo": DPOLoss(), "counting": Counting()})
    fresh.load_state_dict(loss.state_dict())
    assert fresh.parts["counting"].seen == [1, 2]
    with pytest.raises(ValueError, match="no part"):
        fresh.load_state_dict({"ipo": {}})
    with pytest.raises(PluginError, match="loss 'dpo' raised ValueError.*keeps no state"):
        fresh.load_state_dict({"dpo": {"x": 1}})


def test_resolve_loss_shares_plain_keys_and_qualified_keys_win():
    """-o beta=0.2 goes to both (each declares beta), -o ipo.beta=0.3 to ipo alone and beats
    the plain key there; length_normalize only to ipo; weights to the combination."""
    catalog = collect(get_plugin_manager(load_entrypoints=False))
    loss = resolve_loss("dpo+ipo", {"dpo+ipo": {"beta": "0.2", "weights": "1,0.5",
                                                "length_normalize": "false"},
                                    "ipo": {"beta": "0.3"}}, catalog)
    assert options_record(loss) == {"dpo+ipo": {"weights": [1.0, 0.5]},
                                    "dpo": {"beta": 0.2},
                                    "ipo": {"beta": 0.3, "length_normalize": False}}
    single = resolve_loss("dpo", {"dpo": {"beta": "0.2"}}, catalog)
    assert type(single) is DPOLoss and options_record(single) == {"dpo": {"beta": 0.2}}


def test_file_origins_follow_the_layer_that_set_each_value(tmp_path):
    """What resolve_config records of where a config file gave the loss and its options: the
    line of each key, plain ([options] KEY, for the loss) or a part's ([options.PART] KEY, or
    PART.KEY under [options]); a flag that sets a value again takes it out."""
    from dpo.core.training.config import FileOrigin, read_config_file, resolve_config

    path = tmp_path / "run.toml"
    path.write_text('max_steps = 2\nloss = ["dpo", "ipo"]\n\n[options]\nweights = [1.0, 0.5]\n'
                    'dpo.beta = 0.3\n\n[options.ipo]\nbeta = 0.2\nlength_normalize = false\n')
    table = read_config_file(path)
    origins = resolve_config(table, {"loss": None, "options": {}}).file_origins
    assert origins == {
        "loss": FileOrigin(f"{path}:2", "loss", ["dpo", "ipo"]),
        ("dpo+ipo", "weights"): FileOrigin(f"{path}:5", "[options] weights", [1.0, 0.5]),
        ("dpo", "beta"): FileOrigin(f"{path}:6", "[options.dpo] beta", 0.3),
        ("ipo", "beta"): FileOrigin(f"{path}:9", "[options.ipo] beta", 0.2),
        ("ipo", "length_normalize"): FileOrigin(f"{path}:10", "[options.ipo] length_normalize",
                                                False)}
    flagged = resolve_config(table, {"loss": ["dpo", "sft"],
                                     "options": {"ipo.beta": "0.1", "weights": "1,1"}})
    assert set(flagged.file_origins) == {("dpo", "beta"), ("ipo", "length_normalize")}


def test_a_loss_name_holding_plus_is_refused_at_registration():
    assert "'+'" in (type("Bad", (DPOLoss,), {"name": "a+b"}).registration_problem() or "")
    assert DPOLoss.registration_problem() is None


# -- runs ------------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    return command_line(plugin_of(CrashAt, NllLoss))


def args(pairs: Path, out: Path, steps: int = 2) -> list[str]:
    return ["run", "--model", "tiny", "--data", str(pairs), "--backend", "cpu", "--max-steps",
            str(steps), "--batch-size", "4", "--lr", "1e-3", "--output", str(out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_combined_run_logs_each_part_records_the_weights_and_evaluates(tmp_path, pairs, cli):
    """dpo x1.0 + nll x0.5: every step's loss is 1.0 * loss/dpo + 0.5 * loss/nll (float32
    sums, so to 1e-5); at step 1 the policy is its reference, so loss/dpo = ln 2. Evaluations
    log eval/loss/<part>; `dpo eval` of the run rebuilds the same combination from run.json."""
    out = tmp_path / "out"
    result = cli(*args(pairs, out), "--loss", "dpo", "--loss", "nll", "-o", "weights=1.0,0.5",
                 "-o", "beta=0.5", "--eval-fraction", "0.25")
    assert result.exit_code == 0, result.output
    assert "loss dpo (x1.0) + nll (x0.5)," in result.output
    rows = records(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss/dpo"] + 0.5 * r["loss/nll"], rel=1e-5)
        assert "nll/tokens" in r
    assert steps[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-6)
    evals = [r for r in rows if "eval/loss" in r]
    assert len(evals) == 2
    for r in evals:
        assert r["eval/loss"] == pytest.approx(r["eval/loss/dpo"] + 0.5 * r["eval/loss/nll"],
                                               rel=1e-5)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"] == "dpo+nll"
    options = run["resolved"]["options"]
    assert options["dpo+nll"] == {"weights": [1.0, 0.5]} and options["dpo"] == {"beta": 0.5}
    assert options["nll"] == {}

    evaluated = cli("eval", "--model", str(out), "--data", str(pairs), "--backend", "cpu",
                    "--json")
    assert evaluated.exit_code == 0, evaluated.output
    shown = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert shown["loss"] == "dpo+nll"
    assert shown["options"]["dpo+nll"] == {"weights": [1.0, 0.5]}
    metrics = shown["metrics"]
    assert metrics["loss"] == pytest.approx(metrics["loss/dpo"] + 0.5 * metrics["loss/nll"],
                                            rel=1e-5)


def test_one_loss_runs_as_before(tmp_path, pairs, cli):
    out = tmp_path / "out"
    result = cli(*args(pairs, out, 1), "--loss", "dpo", "--no-eval-at-start")
    assert result.exit_code == 0, result.output
    assert "loss dpo, 1 steps" in result.output
    assert not any(k.startswith("loss/") for r in records(out) for k in r)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"] == "dpo"
    assert set(run["resolved"]["options"]) == {"dpo", "nan-guard"}


def test_config_file_lists_the_losses_and_a_flag_beats_the_file(tmp_path, pairs, cli):
    """The file: loss = ["dpo", "ipo"], [options] weights = [1.0, 0.5] and beta = 0.2 (both
    parts), [options.ipo] length_normalize = false. The flag -o weights=1,0.25 wins over the
    file's weights; the rest comes from the file."""
    config = tmp_path / "run.toml"
    config.write_text('loss = ["dpo", "ipo"]\n\n[options]\nweights = [1.0, 0.5]\nbeta = 0.2\n\n'
                      '[options.ipo]\nlength_normalize = false\n')
    common = ["--config", str(config), "--no-eval-at-start"]
    from_file = cli(*args(pairs, tmp_path / "file", 1), *common)
    assert from_file.exit_code == 0, from_file.output
    flagged = cli(*args(pairs, tmp_path / "flag", 1), *common, "-o", "weights=1,0.25")
    assert flagged.exit_code == 0, flagged.output
    for name, weights in (("file", [1.0, 0.5]), ("flag", [1.0, 0.25])):
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["config"]["loss"] == "dpo+ipo"
        assert run["resolved"]["options"]["dpo+ipo"] == {"weights": weights}
        assert run["resolved"]["options"]["dpo"] == {"beta": 0.2}
        assert run["resolved"]["options"]["ipo"] == {"beta": 0.2, "length_normalize": False}
    step = records(tmp_path / "flag")[0]
    assert step["loss"] == pytest.approx(step["loss/dpo"] + 0.25 * step["loss/ipo"], rel=1e-5)


@pytest.mark.parametrize("given, fragment", [
    (["--loss", "dpo", "--loss", "ipo", "-o", "weights=1"],
     "loss 'dpo+ipo': option weights=1: 1 weight(s) for 2 losses (dpo, ipo)"),
    (["--loss", "dpo", "--loss", "ipo", "-o", "weights=1,-0.5"], "each weight must be a finite"),
    (["--loss", "dpo", "--loss", "ipo", "-o", "weights=0,0"], "every weight is 0"),
    (["--loss", "dpo", "--loss", "ipo", "-o", "weights=a,b"], "not a list of numbers"),
    (["--loss", "dpo", "--loss", "nope"], "unknown loss 'nope'"),
    (["--loss", "dpo", "--loss", "ipo", "-o", "gamma=1"],
     "option 'gamma' belongs to none of its parts (dpo: beta; ipo: beta, length_normalize"),
    (["--loss", "dpo", "--loss", "dpo"], "loss 'dpo' is named twice (dpo+dpo"),
    (["--loss", "dpo", "--loss", "ipo", "-o", "cdpo.eps=0.1"],
     "options given for 'cdpo', which this run does not use"),
    (["--loss", "dpo", "--loss", "ipo", "-o", "ipo.beta=-1"], "loss 'ipo': option beta=-1"),
    (["--loss", "dpo", "-o", "weights=1,1"], "option weights weighs losses trained together"),
    (["--loss", "dpo", "--loss", "kto"], "loss 'kto' trains on unpaired examples"),
])
def test_bad_combinations_are_one_line_errors(tmp_path, pairs, cli, given, fragment):
    out = tmp_path / "out"
    result = cli(*args(pairs, out), *given)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("text, line, fragment", [
    ('loss = ["dpo", "ipo"]\n[options]\nweights = [1.0, 0.5, 2.0]\n', 3,
     "[options] weights = [1.0, 0.5, 2.0]: 3 weight(s) for 2 losses (dpo, ipo); give one per "
     "loss, in that order (e.g. weights = [1.0, 1.0])"),
    ('loss = ["dpo", "ipo"]\n\n[options]\nbeta = 0.1\nweights = [1.0, -0.5]\n', 5,
     "[options] weights = [1.0, -0.5]: each weight must be a finite number >= 0"),
    ('loss = ["dpo", "ipo"]\n[options]\nweights = [0, 0]\n', 3, "every weight is 0"),
    ('loss = ["dpo", "ipo"]\n[options]\nweights = "1,x"\n', 3,
     '[options] weights = "1,x": not a list of numbers'),
    ('# two losses\nloss = ["dpo", "dpo"]\n', 2,
     "loss = [\"dpo\", \"dpo\"]: loss 'dpo' is named twice; name each loss once"),
    ('loss = ["dpo", "ipo"]\n[options]\nbeta = 0.2\ngamma = 1\n', 4,
     "[options] gamma = 1: option 'gamma' belongs to none of the parts of loss 'dpo+ipo' (dpo: "
     "beta; ipo: beta, length_normalize; and weights)"),
    ('loss = ["dpo", "ipo"]\n\n[options.ipo]\nlength_normalize = false\nbeta = -1\n', 5,
     "[options.ipo] beta = -1: loss 'ipo': Input should be greater than 0"),
    ('loss = ["dpo", "ipo"]\n[options]\nipo.beta = -1\n', 3,
     "[options.ipo] beta = -1: loss 'ipo': Input should be greater than 0"),
    ('loss = ["dpo", "ipo"]\n[options]\nbeta = -1\n', 3,
     "[options] beta = -1: loss 'dpo': Input should be greater than 0"),
    ('loss = ["dpo", "ipo"]\n[options.ipo]\nwidth = 2\n', 3,
     "[options.ipo] width = 2: loss 'ipo': unknown option 'width' (valid: beta, length_normalize)"),
    ('loss = ["dpo", "kto"]\n', 1, "loss 'kto' trains on unpaired examples"),
    ('loss = ["dpo", "nope"]\n', 1, "loss = [\"dpo\", \"nope\"]: unknown loss 'nope'"),
    ('loss = "dpo"\n[options]\nweights = [1.0, 0.5]\n', 3,
     "[options] weights = [1.0, 0.5]: weights weighs losses trained together, and loss is "
     "'dpo' alone; give several (e.g. loss = [\"dpo\", \"ipo\"])"),
])
def test_a_config_file_s_bad_combination_is_reported_at_its_line(tmp_path, pairs, cli, text,
                                                                  line, fragment):
    """Each error about the combination names the file and the line of the key concerned (the
    loss list, or the [options] key), then the key and value as the file writes them."""
    config = tmp_path / "run.toml"
    config.write_text(text)
    result = cli(*args(pairs, tmp_path / "out"), "--config", str(config))
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {config}:{line}: "), lines[0]
    assert fragment in lines[0] and lines[0].endswith("; fix it in the config file"), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_flag_over_a_config_file_is_reported_as_the_flag(tmp_path, pairs, cli):
    """The file's weights are replaced by -o weights=1 (wrong for two losses): the error is the
    flag's, not the file's line; the file's loss list with a flag's duplicate --loss is the
    flag's too."""
    config = tmp_path / "run.toml"
    config.write_text('loss = ["dpo", "ipo"]\n[options]\nweights = [1.0, 0.5]\n')
    flagged = cli(*args(pairs, tmp_path / "out"), "--config", str(config), "-o", "weights=1")
    assert flagged.exit_code == 2, flagged.output
    assert flagged.output.strip().startswith(
        "error: loss 'dpo+ipo': option weights=1: 1 weight(s) for 2 losses"), flagged.output
    assert str(config) not in flagged.output
    twice = cli(*args(pairs, tmp_path / "out"), "--config", str(config), "--loss", "ipo",
                "--loss", "ipo")
    assert twice.exit_code == 2, twice.output
    assert "loss 'ipo' is named twice (ipo+ipo; --loss" in twice.output
    assert str(config) not in twice.output
    assert not (tmp_path / "out").exists()
