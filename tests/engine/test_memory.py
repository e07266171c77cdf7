"""Freed memory kept for reuse: glibc's thresholds set for a run, free memory trimmed after."""

import pytest

import fedsim
from fedsim.engine import memory
from fedsim.engine.memory import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MALLOC_ENV,
    child_environment,
    reused_memory,
)


class FakeLibc:
    """Records mallopt/malloc_trim calls; ``refuse`` parameters answer 0, as glibc does."""

    def __init__(self, refuse=()):
        self.calls = []
        self.refuse = set(refuse)

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 0 if param in self.refuse else 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_thresholds_are_set_at_the_start_and_free_memory_trimmed_at_the_end():
    libc = FakeLibc()
    with reused_memory(True, libc) as applied:
        assert applied
        assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20),
                              ("mallopt", M_TRIM_THRESHOLD, 64 * 2**20)]
        libc.calls.clear()
    assert libc.calls == [("malloc_trim", 0)]


def test_trimmed_even_when_the_run_raises_and_a_refusal_is_reported():
    libc = FakeLibc(refuse={M_MMAP_THRESHOLD, M_TRIM_THRESHOLD})
    with pytest.raises(RuntimeError, match="boom"), reused_memory(True, libc) as applied:
        assert not applied  # glibc took neither setting
        raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_disabled_or_not_glibc_changes_nothing(monkeypatch):
    libc = FakeLibc()
    with reused_memory(False, libc) as applied:
        assert not applied
    assert libc.calls == []
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert memory.glibc() is None
    with reused_memory(True) as applied:
        assert not applied


@pytest.mark.skipif(memory.glibc() is None, reason="needs Linux with glibc")
def test_this_glibc_accepts_the_settings():
    with reused_memory(True) as applied:
        assert applied


def test_child_environment_adds_only_what_is_unset_and_removes_it_after():
    env = {"MALLOC_TRIM_THRESHOLD_": "7", "PATH": "/bin"}
    with child_environment(True, env):
        assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
        assert env["MALLOC_TRIM_THRESHOLD_"] == "7"  # the user's own setting wins
    assert env == {"MALLOC_TRIM_THRESHOLD_": "7", "PATH": "/bin"}
    with child_environment(False, env):
        assert "MALLOC_MMAP_THRESHOLD_" not in env


@pytest.mark.parametrize("reuse", ["true", "false"])
def test_a_run_applies_the_setting_it_asks_for(tmp_path, monkeypatch, reuse):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "glibc", lambda: libc)
    fedsim.run("scenarios/quickstart.toml", [
        "server.rounds=1", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0", "model.width=8", f"engine.reuse_memory={reuse}"],
        out=tmp_path / "r")
    assert bool(libc.calls) == (reuse == "true")
    if libc.calls:
        assert libc.calls[-1] == ("malloc_trim", 0)
