"""Client states go to an append-only journal: a checkpoint writes only what changed."""

import pytest
import torch
from test_resume import STATEFUL, assert_same_run, interrupted_copy

import fedsim
import fedsim.checkpoint as checkpoint_module
from fedsim.checkpoint import read_checkpoint
from fedsim.errors import CheckpointError
from fedsim.state_journal import StateJournal, read_journal

MORE_ROUNDS = [*STATEFUL, "server.rounds=6", "partition.num_clients=12"]


def test_journal_replays_the_last_entry_per_client_and_deletions(tmp_path):
    j = StateJournal(tmp_path, 0)
    first = j.append([(1, b"a" * 10), (2, b"b" * 5)])
    second = j.append([(1, b"c" * 7), (2, None), (3, b"d")])
    j.close()
    assert read_journal(j.path, first) == {1: b"a" * 10, 2: b"b" * 5}  # an earlier prefix
    assert read_journal(j.path, second) == {1: b"c" * 7, 3: b"d"}


def test_reopening_for_a_resume_drops_the_uncovered_tail(tmp_path):
    j = StateJournal(tmp_path, 3)
    covered = j.append([(5, b"x" * 4)])
    j.append([(6, b"y" * 4)])  # a round that crashed before its checkpoint
    j.close()
    again = StateJournal(tmp_path, 3, valid_bytes=covered)
    assert again.size == covered == j.path.stat().st_size
    again.append([(7, b"z")])
    again.close()
    assert read_journal(again.path, again.size) == {5: b"x" * 4, 7: b"z"}


def test_damaged_or_missing_journal_names_the_file(tmp_path):
    j = StateJournal(tmp_path, 0)
    size = j.append([(1, b"state-bytes")])
    j.close()
    raw = bytearray(j.path.read_bytes())
    raw[-3] ^= 0xFF
    j.path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"client_states\.0\.log.*checksum"):
        read_journal(j.path, size)
    with pytest.raises(CheckpointError, match="truncated"):
        read_journal(j.path, size + 100)
    with pytest.raises(CheckpointError, match="missing"):
        read_journal(tmp_path / "client_states.9.log", size)


def test_each_checkpoint_appends_only_the_clients_that_trained(tmp_path):
    """The checkpoint file stays the same size as more clients hold state; the journal grows
    by the sampled clients' states only, never by a rewrite of everyone's."""
    seen = []

    def progress(rec):  # runs before round rec["round"]'s checkpoint: the previous one's state
        ckpt = tmp_path / "run" / "checkpoint.pt"
        if ckpt.exists():
            meta = read_checkpoint(ckpt).meta.get("client_journal")
            if meta is None:  # no client held state yet: no journal file either
                assert not list(ckpt.parent.glob("client_states.*.log"))
                meta = {"bytes": 0, "clients": 0}
            seen.append((rec["round"], ckpt.stat().st_size, meta["bytes"], meta["clients"]))

    fedsim.run("scenarios/quickstart.toml", MORE_ROUNDS, out=tmp_path / "run", progress=progress)
    clients = [s[3] for s in seen]
    assert clients[0] == 0 and clients[-1] > 3 and clients == sorted(clients)
    sizes = [s[1] for s in seen]
    assert max(sizes) - min(sizes) < 512  # the checkpoint holds no client state itself
    state = read_journal(tmp_path / "run" / "client_states.0.log", seen[-1][2])
    per_client = max(len(v) for v in state.values()) + 16
    growth = [b - a for (_, _, a, _), (_, _, b, _) in zip(seen[1:], seen[2:])]
    assert all(0 < g <= 3 * per_client for g in growth)  # 3 clients per round
    assert len(list((tmp_path / "run").glob("client_states.*.log"))) == 1


def test_a_new_generation_keeps_resume_exact_and_old_files_are_removed(tmp_path, monkeypatch):
    """With no slack every checkpoint starts a new journal generation; resuming from the
    previous checkpoint (an older generation) still gives the uninterrupted run."""
    monkeypatch.setattr(checkpoint_module, "JOURNAL_SLACK", 0)
    ref = fedsim.run("scenarios/quickstart.toml", MORE_ROUNDS, out=tmp_path / "ref").path
    files = sorted(p.name for p in ref.glob("client_states.*.log"))
    assert len(files) == 2  # the latest checkpoint's generation and the previous one's
    latest = read_checkpoint(ref / "checkpoint.pt").meta["client_journal"]["file"]
    assert latest in files and latest != "client_states.0.log"
    resumed = fedsim.resume(interrupted_copy(ref, tmp_path / "resumed"))
    assert_same_run(ref, resumed.path)
    assert torch.load(resumed.path / "model.pt", weights_only=True)


def test_a_run_whose_clients_keep_no_state_writes_no_journal(tmp_path):
    out = fedsim.run("scenarios/quickstart.toml", ["server.rounds=2"], out=tmp_path / "r").path
    assert (out / "checkpoint.pt").exists()
    assert not list(out.glob("client_states.*.log"))
    assert "client_journal" not in read_checkpoint(out / "checkpoint.pt").meta
