"""hack/lib.sh's pid checks and hack/down.sh: a stale pid file is never trusted nor signalled.

No Docker and no real Shoal: a fake ``$venv/bin/shoal`` (a Python script that sleeps) stands
in for ``shoal up``, started with the arguments hack/up.sh gives it. Every process a test
starts is ended by its pid in the test's own cleanup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HACK_DIR = Path(__file__).resolve().parents[2] / "hack"
# Bounds every sleep a fake process does, so none outlives a failed test for long.
FAKE_LIFETIME_S = 60

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux)")


@dataclass
class Clone:
    """A fake clone: its venv with a ``shoal`` that sleeps, its state dir, its processes."""

    root: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def pid_file(self) -> Path:
        return self.state / "shoal.pid"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "SHOAL_VENV": str(self.venv),
            "SHOAL_STATE_DIR": str(self.state),
            **extra,
        }

    def start(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env)
        self.started.append(process)
        return process

    def start_shoal_up(self, *, ignore_term: bool = False, state_dir: Path | None = None) -> int:
        """A fake ``shoal up`` with hack/up.sh's arguments; waits until it has exec'd."""
        shoal = self.venv / "bin" / "shoal"
        env = {**os.environ, "FAKE_ROOT": str(self.root)}
        if ignore_term:
            env["FAKE_IGNORE_TERM"] = "1"
        process = self.start(
            str(shoal), "up", "--state-dir", str(state_dir or self.state), "--port", "1", env=env
        )
        if ignore_term:
            # The fake sets its SIGTERM handling before it says it is ready.
            marker = self.root / f"ready-{process.pid}"
            _wait_for(marker.exists)
        _wait_for(lambda: str(shoal) in _args_of(process.pid))
        return process.pid

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def bash(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f'source "{HACK_DIR}/lib.sh"; {script}'],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=30,
        )


def _args_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return ""


def _wait_for(condition: Callable[[], bool], *, polls: int = 1000) -> None:
    """Polls another process's state, a bounded number of times (10 ms apart)."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the process never reached the expected state")


FAKE_SHOAL = f"""#!{sys.executable}
import os, signal, sys, time
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(os.environ["FAKE_ROOT"], f"ready-{{os.getpid()}}"), "w").close()
time.sleep({FAKE_LIFETIME_S})
"""


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Clone]:
    c = Clone(tmp_path)
    (c.venv / "bin").mkdir(parents=True)
    c.state.mkdir()
    shoal = c.venv / "bin" / "shoal"
    shoal.write_text(FAKE_SHOAL)
    shoal.chmod(0o755)
    yield c
    c.stop_all()


def test_pid_check_accepts_this_clones_running_shoal_up(clone: Clone) -> None:
    pid = clone.start_shoal_up()
    clone.pid_file.write_text(f"{pid}\n")
    result = clone.bash("running_shoal_pid")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(pid)


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "-1\n", "4194304999\n"], ids=repr)
def test_pid_check_refuses_a_pid_file_that_names_no_process(clone: Clone, content: str) -> None:
    clone.pid_file.write_text(content)
    result = clone.bash("running_shoal_pid")
    assert result.returncode != 0
    assert result.stdout == ""


def test_pid_check_refuses_a_missing_pid_file(clone: Clone) -> None:
    assert clone.bash("running_shoal_pid").returncode != 0


def test_pid_check_refuses_an_unrelated_process(clone: Clone) -> None:
    sleeper = clone.start("sleep", str(FAKE_LIFETIME_S))
    clone.pid_file.write_text(f"{sleeper.pid}\n")
    result = clone.bash("running_shoal_pid")
    assert result.returncode != 0
    assert clone.bash(f"pid_alive {sleeper.pid}").returncode == 0, "alive, just not Shoal"


def test_pid_check_refuses_the_shoal_up_of_another_state_dir(clone: Clone) -> None:
    other = clone.root / "other-state"
    pid = clone.start_shoal_up(state_dir=other)
    clone.pid_file.write_text(f"{pid}\n")
    assert clone.bash("running_shoal_pid").returncode != 0


def test_pid_check_refuses_a_zombie(clone: Clone) -> None:
    # A child this test never reaps stays a zombie: `kill -0` succeeds on it.
    zombie = clone.start(sys.executable, "-c", "pass")
    _wait_for(lambda: _state_of(zombie.pid) == "Z")
    clone.pid_file.write_text(f"{zombie.pid}\n")
    assert subprocess.run(["kill", "-0", str(zombie.pid)]).returncode == 0
    assert clone.bash(f"pid_alive {zombie.pid}").returncode != 0
    assert clone.bash("running_shoal_pid").returncode != 0


def down(clone: Clone, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HACK_DIR / "down.sh")],
        env=clone.env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_down_stops_shoal_and_removes_the_pid_file(clone: Clone) -> None:
    pid = clone.start_shoal_up()
    clone.pid_file.write_text(f"{pid}\n")
    result = down(clone)
    assert result.returncode == 0, result.stderr
    assert f"stopping Shoal (pid {pid})" in result.stderr
    assert not clone.pid_file.exists()
    assert clone.started[-1].wait(timeout=10) == -signal.SIGTERM


def test_down_never_signals_an_unrelated_process(clone: Clone) -> None:
    sleeper = clone.start("sleep", str(FAKE_LIFETIME_S))
    clone.pid_file.write_text(f"{sleeper.pid}\n")
    result = down(clone)
    assert result.returncode == 0, result.stderr
    assert "nothing signalled" in result.stderr
    assert sleeper.poll() is None, "the unrelated process still runs"
    assert not clone.pid_file.exists(), "a stale pid file is dropped"


def test_down_says_so_and_keeps_the_pid_file_when_shoal_outlives_the_wait(
    clone: Clone,
) -> None:
    pid = clone.start_shoal_up(ignore_term=True)
    clone.pid_file.write_text(f"{pid}\n")
    result = down(clone, SHOAL_STOP_WAIT_S="0.4")
    assert result.returncode == 1
    assert f"Shoal (pid {pid}) still runs" in result.stderr
    assert clone.pid_file.read_text().strip() == str(pid)
    assert clone.started[-1].poll() is None


def test_down_refuses_a_wait_that_is_not_a_number(clone: Clone) -> None:
    result = down(clone, SHOAL_STOP_WAIT_S="soon")
    assert result.returncode == 2
    assert "SHOAL_STOP_WAIT_S" in result.stderr
