"""Checkpoints on disk: synced before they are named, verified by their manifest, resumed from
the newest good one, and never replacing or pruning a directory the program did not write."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.training import checkpoint as ck
from dpo.core.training import refcache
from dpo.core.interfaces.errors import DpoError
from dpo.core.training.loop import TIMING_KEYS
from dpo.core.model.loading import load_model
from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin
from dpo.testing import CrashAt as DieAt
from dpo.testing import plugin_of, write_arithmetic_pairs


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", 0)


def save(output: Path, step: int, tiny, keep: int = 10, **kwargs) -> Path:
    model, tokenizer = tiny
    return ck.save_checkpoint(output, step, model, tokenizer, {"train": {"step": step}},
                              {"rng": [step]}, keep, **kwargs)


def inode(path: Path) -> int:
    return os.stat(path).st_ino


class DiskLog:
    """Records, in order, each fsync (by inode) and each rename."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.fstat(fd).st_ino))
            return real_fsync(fd)

        def replace(src, dst):
            self.events.append(("replace", Path(src).name, Path(dst).name))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, event: tuple) -> int:
        return self.events.index(event)

    def synced(self, ino: int) -> list[int]:
        return [i for i, e in enumerate(self.events) if e == ("fsync", ino)]


def test_a_checkpoint_is_synced_file_by_file_then_renamed_then_its_parent_synced(
        tmp_path, tiny, monkeypatch):
    """Inodes survive a rename, so each file of the finished checkpoint can be matched to the
    fsync of its temporary self: every file and the directory itself before the rename, the
    parent directory after it."""
    log = DiskLog(monkeypatch)
    path = save(tmp_path, 3, tiny)
    renamed = log.index(("replace", ".checkpoint-3.tmp", "checkpoint-3"))
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {"model.safetensors", "trainer_state.pt", ck.MANIFEST} <= {p.name for p in files}
    for p in [*files, path]:
        assert log.synced(inode(p)) and log.synced(inode(p))[0] < renamed, p
    assert any(i > renamed for i in log.synced(inode(tmp_path)))


def test_replacing_final_syncs_the_new_directory_before_either_rename(tmp_path, tiny,
                                                                      monkeypatch):
    model, tokenizer = tiny
    ck.save_model_dir(tmp_path / "final", model, tokenizer)
    log = DiskLog(monkeypatch)
    ck.save_model_dir(tmp_path / "final", model, tokenizer, extra={"note.json": {"a": 1}})
    aside = log.index(("replace", "final", ".final.old"))
    renamed = log.index(("replace", ".final.tmp", "final"))
    assert aside < renamed
    for p in [*(tmp_path / "final").iterdir(), tmp_path / "final"]:
        assert log.synced(inode(p))[0] < aside, p
    assert any(i > renamed for i in log.synced(inode(tmp_path)))
    assert not (tmp_path / ".final.old").exists() and ck.verify(tmp_path / "final") is None


def test_run_record_and_reference_file_are_synced_before_and_after_their_rename(
        tmp_path, monkeypatch):
    log = DiskLog(monkeypatch)
    ck.write_json_atomic(tmp_path / "run.json", {"status": "running"})
    renamed = log.index(("replace", ".run.json.tmp", "run.json"))
    assert log.synced(inode(tmp_path / "run.json"))[0] < renamed
    assert any(i > renamed for i in log.synced(inode(tmp_path)))

    log.events.clear()
    table = refcache.RefLogps("digest", "float32", {bytes(16): (-1.0, -2.0)})
    refcache.write(tmp_path / "ref.safetensors", table)
    renamed = next(i for i, e in enumerate(log.events) if e[0] == "replace")
    assert log.events[renamed][2] == "ref.safetensors"
    assert log.synced(inode(tmp_path / "ref.safetensors"))[0] < renamed
    assert any(i > renamed for i in log.synced(inode(tmp_path)))


def test_the_manifest_lists_every_file_with_its_size_and_digest(tmp_path, tiny):
    path = save(tmp_path, 2, tiny)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    assert manifest["format"] == ck.MANIFEST_FORMAT and manifest["version"] == ck.MANIFEST_VERSION
    on_disk = sorted(p.name for p in path.iterdir() if p.name != ck.MANIFEST)
    assert sorted(manifest["files"]) == on_disk  # the marker of a write in progress is gone
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ck.verify(path) is None and ck.checkpoint_problem(path) is None


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def empty(path: Path) -> None:
    shutil.rmtree(path)
    path.mkdir()


@pytest.mark.parametrize("damage, reason", [
    (lambda p: flip_middle_byte(p / "trainer_state.pt"),
     "trainer_state.pt differs from its manifest (SHA-256)"),
    (lambda p: (p / "trainer_state.pt").unlink(), "trainer_state.pt is missing"),
    (lambda p: truncate(p / "model.safetensors"), "model.safetensors is {size} bytes, its "
                                                  "manifest says {full}"),
    (empty, "empty directory"),
    (lambda p: (p / ck.MANIFEST).unlink(), ck.NO_MANIFEST),
    (lambda p: (p / ck.MANIFEST).write_text("{"), f"unreadable {ck.MANIFEST}"),
])
def test_verify_names_what_is_wrong(tmp_path, tiny, damage, reason):
    path = save(tmp_path, 2, tiny)
    full = (path / "model.safetensors").stat().st_size
    damage(path)
    assert ck.verify(path) == reason.format(size=full - 100, full=full)


def test_a_checkpoint_from_before_manifests_is_accepted_when_its_files_load(tmp_path, tiny):
    path = save(tmp_path, 2, tiny)
    (path / ck.MANIFEST).unlink()
    assert ck.checkpoint_problem(path) is None
    truncate(path / "trainer_state.pt")
    assert ck.checkpoint_problem(path) == (f"{ck.NO_MANIFEST}, and trainer_state.pt does not "
                                           "load (RuntimeError)")
    (path / "trainer_state.json").unlink()
    assert ck.checkpoint_problem(path) == f"{ck.NO_MANIFEST}, and trainer_state.json is missing"


def test_a_checkpoint_from_before_manifests_with_truncated_weights_is_refused(tmp_path, tiny):
    path = save(tmp_path, 2, tiny)
    (path / ck.MANIFEST).unlink()
    truncate(path / "model.safetensors")
    assert ck.checkpoint_problem(path) == (f"{ck.NO_MANIFEST}, and model.safetensors does not "
                                           "load (SafetensorError)")


def test_resumable_checkpoint_passes_over_damaged_newer_ones_and_deletes_nothing(tmp_path, tiny):
    for step in (2, 4, 6):
        save(tmp_path, step, tiny)
    flip_middle_byte(tmp_path / "checkpoint-6" / "trainer_state.pt")
    empty(tmp_path / "checkpoint-4")
    found, skipped = ck.resumable_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-2"
    assert skipped == [(tmp_path / "checkpoint-6", "trainer_state.pt differs from its manifest "
                                                   "(SHA-256)"),
                       (tmp_path / "checkpoint-4", "empty directory")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                         "checkpoint-6"]
    empty(tmp_path / "checkpoint-2")
    assert ck.resumable_checkpoint(tmp_path)[0] is None


def failing_save(after: int):
    """A torch.save that writes ``after`` bytes of the file, then finds the disk full."""

    def save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * after)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_directory(
        tmp_path, tiny, monkeypatch):
    save(tmp_path, 2, tiny)
    monkeypatch.setattr(torch, "save", failing_save(1000))
    with pytest.raises(DpoError) as caught:
        save(tmp_path, 4, tiny, keep=1)
    assert str(caught.value) == (f"cannot write checkpoint-4 under {tmp_path}: No space left on "
                                 f"device; free space and resume with --resume {tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert ck.verify(tmp_path / "checkpoint-2") is None


def test_a_full_disk_while_replacing_final_keeps_the_old_one(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    ck.save_model_dir(tmp_path / "final", model, tokenizer)
    before = (tmp_path / "final" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "write_manifest", full)
    with pytest.raises(DpoError, match=r"^cannot write final under .*: No space left on device"):
        ck.save_model_dir(tmp_path / "final", model, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before


def test_pruning_leaves_a_users_own_checkpoint_directory_alone(tmp_path, tiny):
    """keep=1: of the program's checkpoints 2 and 3 only 3 stays; the user's checkpoint-1
    neither goes nor counts among those kept, and is warned about once."""
    mine = tmp_path / "checkpoint-1"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own")
    warnings: list[str] = []
    save(tmp_path, 2, tiny, keep=1, warn=warnings.append)
    save(tmp_path, 3, tiny, keep=1, warn=warnings.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert (mine / "notes.txt").read_text() == "my own"
    assert warnings == [f"{mine}: not written by dpo-trainer (no {ck.MANIFEST}); left in place, "
                        "and not counted among the checkpoints kept"]


def test_pruning_keeps_damaged_checkpoints_newer_than_the_step(tmp_path, tiny):
    """Resumed from 2 past a damaged 6: at step 4 with keep=1, 2 goes, 6 waits to be
    replaced when the run reaches it."""
    for step in (2, 6):
        save(tmp_path, step, tiny)
    save(tmp_path, 4, tiny, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.parametrize("name", ["checkpoint-3", ".checkpoint-3.tmp", ".checkpoint-3.old"])
def test_a_directory_in_the_way_that_the_program_did_not_write_is_refused(tmp_path, tiny, name):
    save(tmp_path, 3, tiny)  # so that the old copy is moved aside, through .checkpoint-3.old
    mine = tmp_path / name
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    (mine / "notes.txt").write_text("my own")
    with pytest.raises(DpoError) as caught:
        save(tmp_path, 3, tiny)
    assert str(caught.value) == (
        f"{mine}: in the way, and not written by dpo-trainer (no {ck.MANIFEST}); move it out "
        f"of {tmp_path}, then resume with --resume {tmp_path}")
    assert (mine / "notes.txt").read_text() == "my own"


def test_what_a_crash_leaves_is_replaced(tmp_path, tiny):
    """An empty checkpoint directory, and a temporary one holding the marker of a write in
    progress, are the program's own: the next checkpoint of that step replaces them."""
    (tmp_path / "checkpoint-3").mkdir()
    partial = tmp_path / ".checkpoint-3.tmp"
    partial.mkdir()
    (partial / ck.WRITING).touch()
    (partial / "model.safetensors").write_bytes(b"half")
    save(tmp_path, 3, tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert ck.verify(tmp_path / "checkpoint-3") is None


def test_a_damaged_trainer_state_is_one_line(tmp_path, tiny):
    path = save(tmp_path, 2, tiny)
    truncate(path / "trainer_state.pt")
    with pytest.raises(DpoError, match=r"trainer_state.pt: cannot be read \(.*\); the "
                                       r"checkpoint is damaged: move .* aside"):
        ck.load_checkpoint_state(path)


# -- resume, end to end --------------------------------------------------------------------------

def cli():
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, plugin_of(DieAt), "die-plugin")
    app = make_app(pm)
    return lambda *args: CliRunner().invoke(app, ["run", "--no-progress", *args])


def args(tmp: Path, out: Path) -> list[str]:
    data = write_arithmetic_pairs(tmp / "pairs.jsonl")
    return ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--loss", "dpo",
            "--max-steps", "6", "--lr", "1e-3", "--batch-size", "4", "--save-steps", "2",
            "--stop", "crash-at", "--output", str(out)]


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run, and one killed at step 5 (after checkpoints 2 and 4)."""
    tmp = tmp_path_factory.mktemp("runs")
    invoke = cli()
    straight = invoke(*args(tmp, tmp / "straight"))
    assert straight.exit_code == 0, straight.output
    DieAt.armed_at = 5
    crashed = invoke(*args(tmp, tmp / "crashed"))
    assert crashed.exit_code == 1 and "raised RuntimeError" in crashed.output
    assert sorted(p.name for p in (tmp / "crashed").glob("checkpoint-*")) == ["checkpoint-2",
                                                                             "checkpoint-4"]
    return tmp / "straight", tmp / "crashed"


def said(output: str) -> str:
    """The console's output with line breaks undone: a terminal's width must not matter."""
    return " ".join(output.split())


@pytest.mark.parametrize("damage, reason", [
    (lambda p: flip_middle_byte(p / "trainer_state.pt"),
     "trainer_state.pt differs from its manifest (SHA-256)"),
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    (lambda p: truncate(p / "model.safetensors"),
     "model.safetensors is {cut} bytes, its manifest says {full}"),
    (empty, "empty directory"),
    (lambda p: ((p / ck.MANIFEST).unlink(), truncate(p / "trainer_state.pt")),
     f"{ck.NO_MANIFEST}, and trainer_state.pt does not load (RuntimeError)"),
], ids=["flipped-byte", "missing-file", "truncated-weights", "empty-dir", "no-manifest-broken"])
def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_as_if_uninterrupted(
        tmp_path, runs, damage, reason):
    straight, crashed = runs
    out = tmp_path / "out"
    shutil.copytree(crashed, out)
    full = (out / "checkpoint-4" / "model.safetensors").stat().st_size
    damage(out / "checkpoint-4")
    resumed = cli()("--resume", str(out))
    assert resumed.exit_code == 0, resumed.output
    text = said(resumed.output)
    reason = reason.format(cut=full - 100, full=full)
    assert text.count("damaged") == 1
    assert f"warning: checkpoint-4 is damaged ({reason}); resuming from checkpoint-2" in text
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(out) == records(straight)
    assert ck.verify(out / "checkpoint-4") is None  # replaced by the resumed run's own


def test_a_checkpoint_from_before_manifests_is_resumed_with_a_note(tmp_path, runs):
    straight, crashed = runs
    out = tmp_path / "out"
    shutil.copytree(crashed, out)
    (out / "checkpoint-4" / ck.MANIFEST).unlink()
    resumed = cli()("--resume", str(out))
    assert resumed.exit_code == 0, resumed.output
    assert "damaged" not in resumed.output
    assert said(resumed.output).count("checkpoint-4 has no manifest (written by an earlier "
                                      "version): its files load") == 1
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-4")
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_is_one_line_naming_them(tmp_path, runs):
    _, crashed = runs
    out = tmp_path / "out"
    shutil.copytree(crashed, out)
    empty(out / "checkpoint-4")
    (out / "checkpoint-2" / "trainer_state.pt").unlink()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    resumed = cli()("--resume", str(out))
    assert resumed.exit_code == 2
    assert resumed.output.strip().splitlines() == [
        f"error: {out}: no checkpoint to resume from: every one is damaged: checkpoint-4 "
        "(empty directory); checkpoint-2 (trainer_state.pt is missing); start over with "
        "--overwrite"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_full_disk_at_a_checkpoint_fails_the_run_in_one_line(tmp_path, runs, monkeypatch):
    """The checkpoint at step 4 finds the disk full: the run stops with one line and status
    failed; checkpoint-2 stays and verifies, and nothing half-written is left."""
    real_save = torch.save

    def save(obj, path, *a, **kw):
        if Path(path).parent.name == ".checkpoint-4.tmp":
            return failing_save(1000)(obj, path)
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    result = cli()(*args(tmp_path, out))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1:] == [
        f"error: cannot write checkpoint-4 under {out}: No space left on device; free space "
        f"and resume with --resume {out}"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert ck.verify(out / "checkpoint-2") is None
    assert json.loads((out / "run.json").read_text())["status"].startswith(
        "failed: cannot write checkpoint-4")
