"""How `--nproc` runs end: the launcher's supervision of torchrun, and a worker's exit. A
finished worker that never exits (a teardown deadlock in the interpreter) must not leave the
run, and whoever waits on it, hanging. No torchrun here: stand-in commands do what a worker
does (record its exit code) and then what a hung one does (stay)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dpo.cli import run as cli_run

# A stand-in for torchrun: records an exit code for each rank (as dpo's workers do), writes a
# line of output, then hangs (sleeps) unless told to exit with a status.
STAND_IN = textwrap.dedent("""
    import os, sys, time
    exits, codes, then = os.environ["DPO_EXIT_DIR"], sys.argv[1].split(","), sys.argv[2]
    print("worker output", file=sys.stderr, flush=True)
    for rank, code in enumerate(codes):
        with open(os.path.join(exits, f"rank-{rank}"), "w") as f:
            f.write(code + "\\n")
    if then == "hang":
        time.sleep(600)
    sys.exit(int(then))
""")


def supervise(tmp_path: Path, codes: str, then: str, linger: float = 2.0):
    exits = tmp_path / "exits"
    exits.mkdir()
    env = dict(os.environ, DPO_EXIT_DIR=str(exits))
    start = time.monotonic()
    status, recorded = cli_run.supervise([sys.executable, "-c", STAND_IN, codes, then], env,
                                         exits, nproc=len(codes.split(",")), linger=linger)
    return status, recorded, time.monotonic() - start


def test_a_run_whose_workers_finished_but_hang_ends_with_their_codes(tmp_path, capfd):
    """Both ranks recorded 0 and the process then hangs (sleeps 600 s): stopped about
    ``linger`` (2 s) later, the run's status 0, with a warning saying so."""
    status, recorded, took = supervise(tmp_path, "0,0", "hang")
    assert (status, recorded) == (0, {0: 0, 1: 0})
    assert took < 60
    err = capfd.readouterr().err
    assert "worker output" in err
    assert "every worker recorded its exit code" in err and "stopped it" in err


def test_a_hung_run_with_a_failed_worker_keeps_that_workers_code(tmp_path, capfd):
    status, recorded, _ = supervise(tmp_path, "0,3", "hang")
    assert recorded == {0: 0, 1: 3}


def test_a_run_that_ends_by_itself_is_not_stopped(tmp_path, capfd):
    """torchrun's own status comes back, with no warning, however long ``linger`` is."""
    status, recorded, took = supervise(tmp_path, "0,0", "0", linger=600)
    assert (status, recorded) == (0, {0: 0, 1: 0})
    assert took < 60
    assert "stopped it" not in capfd.readouterr().err


def test_a_hung_worker_with_codes_missing_is_left_to_run(tmp_path, capfd):
    """Only one of two ranks recorded a code: the launcher does not stop what may still be
    working (here the stand-in exits with status 5 on its own after recording)."""
    status, recorded, _ = supervise(tmp_path, "0", "5", linger=0.0)
    assert status == 5 and recorded == {0: 0}


def test_a_torchrun_worker_exits_despite_a_thread_that_never_ends(tmp_path):
    """A worker (RANK and WORLD_SIZE set, as torchrun sets them) whose command is done ends
    with its command's status even though a non-daemon thread still runs, which a normal
    interpreter exit would wait on forever: the stand-in for a teardown that never returns.
    Without that, the process waits on the thread and the run times out."""
    script = textwrap.dedent("""
        import sys, threading, time
        threading.Thread(target=time.sleep, args=(600,)).start()  # not a daemon
        from dpo.cli import main
        main(sys.argv[1:])
    """)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1")
    done = subprocess.run([sys.executable, "-c", script, "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage" in done.stdout
    done = subprocess.run([sys.executable, "-c", script, "no-such-command"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no-such-command" in done.stderr


def test_a_first_ctrl_c_waits_for_the_workers_checkpoint(tmp_path, capfd):
    """Ctrl-C reaches the launcher and the workers alike. The launcher's first one waits for
    the workers (here they take 2 s to record 130 and end, as after a checkpoint), and the
    run's status is theirs; it does not leave them behind."""
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    exits = tmp_path / "exits"
    exits.mkdir()
    slow = STAND_IN.replace('print("worker output"', 'time.sleep(2); print("worker output"')
    try:
        status, recorded = cli_run.supervise([sys.executable, "-c", slow, "130,130", "130"],
                                             dict(os.environ, DPO_EXIT_DIR=str(exits)), exits,
                                             nproc=2, linger=60)
    finally:
        timer.cancel()
    assert (status, recorded) == (130, {0: 130, 1: 130})
    assert "worker output" in capfd.readouterr().err


def test_the_relay_drops_torchruns_log_lines_and_its_traceback(monkeypatch, capsys):
    """After a Ctrl-C torchrun logs first, then the workers say where they stopped, then
    torchrun's traceback follows: only the workers' lines come through."""
    output = io.StringIO(
        "training tiny on cpu\n"
        "W1206 23:31:32.781000 27152 torch/distributed/elastic/agent/server/api.py:753] "
        "Received 2 death signal, shutting down workers\n"
        "W1206 23:31:32.788000 27152 torch/distributed/elastic/multiprocessing/api.py:1028] "
        "Sending process 27156 closing signal SIGINT\n"
        "warning: stopping after this step, with a checkpoint\n"
        "error: stopped on request at step 7; resume with --resume out\n"
        "Traceback (most recent call last):\n"
        '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
        "torch.distributed.elastic.multiprocessing.api.SignalException: got signal: 2\n")
    failed = threading.Event()
    cli_run._relay(output, failed)
    assert capsys.readouterr().err == ("training tiny on cpu\n"
                                       "warning: stopping after this step, with a checkpoint\n"
                                       "error: stopped on request at step 7; resume with "
                                       "--resume out\n")
    assert failed.is_set() and output.closed


def test_a_workers_repeated_ctrl_c_within_two_seconds_is_one_request(monkeypatch):
    """Under torchrun a worker gets one Ctrl-C twice (the terminal's, then torchrun's): within
    2 s the second is the same request; later it stops at once (KeyboardInterrupt).
    Outside torchrun a second signal always stops at once."""
    from dpo.core.training.loop import StopRequest

    class Quiet:
        def warn(self, message):
            pass

    now = [100.0]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    request = StopRequest(Quiet(), clock=lambda: now[0])
    request._handle(signal.SIGINT, None)
    now[0] += 0.2
    request._handle(signal.SIGINT, None)  # torchrun's copy: no exception
    assert request.requested
    now[0] += 2.0
    with pytest.raises(KeyboardInterrupt):
        request._handle(signal.SIGINT, None)

    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    alone = StopRequest(Quiet(), clock=lambda: now[0])
    alone._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        alone._handle(signal.SIGINT, None)
