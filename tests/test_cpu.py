"""cpu.py: the threads a merge takes are the affine cores less what other processes keep busy on
them now (measured over a window), not the 1-minute load average."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from streammerge import cpu

STAT = b"""cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 400 0 100 2000 50 10 5 20 7 0
cpu1 500 0 200 3000 50 0 0 0 0 0
intr 12345
ctxt 678
"""


def test_busy_seconds_counts_the_listed_cpus_less_idle_and_io_wait():
    # cpu0: user 400 + system 100 + irq 10 + softirq 5 + steal 20 (guest 7 is inside user)
    assert cpu.busy_seconds(STAT, {0}, 100) == pytest.approx(5.35)
    assert cpu.busy_seconds(STAT, {1}, 100) == pytest.approx(7.0)
    assert cpu.busy_seconds(STAT, {0, 1}, 100) == pytest.approx(12.35)
    assert cpu.busy_seconds(STAT, {5}, 100) == 0.0


@pytest.mark.parametrize("others, threads", [(0.0, 2), (0.3, 2), (0.8, 1), (1.0, 1), (2.0, 1)])
def test_choose_threads_takes_the_cores_others_leave(monkeypatch, others, threads):
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    monkeypatch.setattr(cpu, "others_busy", lambda: others)
    assert cpu.choose_threads() == threads
    assert cpu.choose_threads(3) == 3  # --threads wins


def test_the_load_average_where_nothing_better_is_known(monkeypatch):
    monkeypatch.setattr(cpu, "available_cores", lambda: 4)
    monkeypatch.setattr(cpu, "others_busy", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 0.0, 0.0))
    assert cpu.choose_threads() == 2


def test_others_busy_subtracts_this_process_over_the_window(monkeypatch):
    monkeypatch.setattr(cpu, "_mark", None)  # restored after: later merges measure for real
    clock = iter([10.0, 12.0, 12.0])  # mark, its age check, the end: a 2 s window
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    busy = iter([100.0, 103.0])  # all affine cores: 3 s busy in the window
    monkeypatch.setattr(cpu, "_busy_seconds", lambda cpus: next(busy))
    own = iter([5.0, 6.0])  # 1 s of it ours
    monkeypatch.setattr(cpu, "_own_seconds", lambda: next(own))
    cpu.mark()
    assert cpu.others_busy() == pytest.approx(1.0)  # (3 − 1) / 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measured from Linux's /proc/stat")
def test_a_busy_process_beside_us_is_measured(monkeypatch):
    monkeypatch.setattr(cpu, "_mark", None)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        cpu.mark()
        time.sleep(0.5)
        assert cpu.others_busy() > 0.5  # one core's worth, less what the scheduler gives others
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.parametrize("given, seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_lets_torchs_openmp_threads_sleep_unless_told(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import os, streammerge.cli as c, streammerge.console as console\n"
        "c.entry = lambda: print(os.environ['OMP_WAIT_POLICY'])\n"
        "console.entry()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == seen
