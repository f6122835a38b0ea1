"""Each heavy stage picks its thread count explicitly: a request wins, then the environment,
then the usable cores less what other processes keep busy (so a stage started beside another
busy process does not oversubscribe the cores)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import pytest
import torch

from branchlens import threads as T


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(T.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_a_request_wins_then_the_environment(no_env, monkeypatch):
    assert T.choose_threads(3) == (3, "requested")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert T.choose_threads()[0] == 2
    monkeypatch.setenv(T.ENV, "1")
    assert T.choose_threads() == (1, f"${T.ENV}")
    monkeypatch.setenv(T.ENV, "zero")  # not a positive count: ignored, the next rule decides
    assert T.choose_threads()[0] == 2


def test_ranks_of_one_node_share_the_cores(no_env, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(T.usable_cores() * 4))
    assert T.choose_threads()[0] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_beside_us_is_measured_and_left_its_core(no_env):
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert T.busy_elsewhere() >= 0.5  # one spinning process: about one core
        n, why = T.choose_threads()
        assert n <= max(1, T.usable_cores() - 1) and "busy elsewhere" in why
    finally:
        hog.kill()
        hog.wait()


def test_stage_threads_sets_and_restores_torch_threads(no_env):
    before = torch.get_num_threads()
    lines: list[str] = []
    with T.stage_threads("analyze", requested=1, log=lines.append) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert lines == ["analyze: 1 thread (requested)"]


def test_heavy_stage_keeps_the_signature_the_config_schema_reads():
    from branchlens.stages.viz import visualize_stage

    assert "n_latents" in inspect.signature(visualize_stage).parameters
    assert visualize_stage.__wrapped__.__name__ == "visualize_stage"


def test_the_governor_follows_other_processes_load(no_env, monkeypatch):
    """While training, the thread count follows the load of other processes measured between
    two checks: a busy neighbour takes a core, its end gives it back; a fixed count stays."""
    clock, ticks = [0.0], [(0, 0)]
    hz = T.os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(T, "_busy_ticks", lambda: ticks[0])
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        g = T.Governor()

        def after(seconds: float, ours: float, others: float) -> int | None:
            total, own = ticks[0]
            clock[0] += seconds
            ticks[0] = (total + round((ours + others) * hz * seconds),
                        own + round(ours * hz * seconds))
            return g.check()

        assert after(10, ours=4, others=0) is None  # nothing else runs: keep 4
        assert after(10, ours=2, others=2) == 2 and torch.get_num_threads() == 2
        assert after(10, ours=2, others=0) == 4  # the neighbour stopped
        assert after(0.1, ours=0, others=4) is None  # too short a window to judge
        monkeypatch.setenv(T.ENV, "3")
        assert T.Governor().check() is None  # a fixed count is never changed
    finally:
        torch.set_num_threads(before)
