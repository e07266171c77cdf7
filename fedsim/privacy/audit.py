"""Privacy audits of a federated run, wired into the server loop by ``[privacy]``.

The server is the attacker throughout (the threat model of Nasr et al., IEEE S&P 2019):

- ``mia``: membership inference on the global model, at the final round and every
  ``audit_every`` rounds (so norms can be compared at matched accuracy as well as at matched
  rounds). Attacks come from :data:`MIA_ATTACKS` (``loss``: Yeom et al. 2018; ``lira``:
  Carlini et al. 2022, online and offline, with shadow *federations*; ``rmia``: Zarifzadeh
  et al. 2024, offline, on the same shadows as reference models, with the global test set as
  its population). Under DP the final attack scores also give an audited lower bound on ε
  beside the accountant's (:mod:`fedsim.privacy.audit_epsilon`).
- ``client_mia``: the loss attack on each client's own upload of one round.
- ``leakage``: which arrays a client uploads, and how well its data mean is recovered from
  uploaded BatchNorm buffers (Huang et al. 2021; Hatamizadeh et al. 2023).
- ``inversion``: gradient inversion of one client's local step, or of its whole multi-step
  upload (``inversion_target = "update"``), best of ``inversion_restarts`` starts (Geiping
  et al. 2020).
- ``exposure`` (text): canary exposure of planted secrets on the global model and on the
  canary clients' uploads (Carlini et al. 2019; :mod:`fedsim.privacy.exposure_audit`).

Members and non-members (:class:`MembershipPool`): for every participating client, ``k`` of
its local training samples (members) and ``k`` of its local *test* split (non-members: same
client, same distribution, never trained on), ``k = min(#train, #test)``, drawn with
``(seed, "privacy", "pool", client)``. Shadow federation ``i`` runs the same scenario through
the in-process engine — with the same seed, since the server knows the initial model and
which clients it sampled each round (``shadow_reseed`` gives each shadow its own seed for
initialization, sampling and batch order instead); each of its clients trains on its
training samples outside the pool plus a random half of its own pool
(:func:`~fedsim.privacy.mia.shadow_split` per client), so every pool example is IN for half
of the shadows and shadow clients see as many samples as the real ones on average.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message
from scipy.special import expit
from torch import nn

from fedsim.arrays import load_record, model_to_record, record_to_state
from fedsim.client.app import make_client_app
from fedsim.client.canaries import SAMPLE as SAMPLE_CANARY
from fedsim.client.canaries import included as canary_bits
from fedsim.client.canaries import owners as canary_owners
from fedsim.client.canaries import parameter_size, unit_directions
from fedsim.client.compress import as_uploaded
from fedsim.client.hooks import ClientHook
from fedsim.client.runtime import ClientRuntime
from fedsim.client.train import plan_batches, train_local
from fedsim.compat import task_identity_restored
from fedsim.config import Scenario
from fedsim.context import RunContext
from fedsim.data.federated import FederatedData
from fedsim.device import DeviceSplits
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.ordered import ClientOrderedGrid
from fedsim.errors import ScenarioError
from fedsim.models.norm import uses_batch_statistics
from fedsim.privacy.audit_epsilon import AccountantClaim, membership_epsilon
from fedsim.privacy.exposure_audit import ExposureAudit, check_exposure
from fedsim.privacy.inversion import (
    client_gradient,
    image_metrics,
    invert_gradients,
    invert_update,
    match_reconstructions,
    recover_labels,
    save_image_grid,
)
from fedsim.privacy.leakage import (
    KINDS,
    has_running_stats,
    input_stats_from_bn,
    recover_batch_stats,
    uploaded_arrays,
)
from fedsim.privacy.metrics import attack_metrics, plot_roc, roc_points
from fedsim.privacy.mia import (
    lira_scores,
    loss_attack,
    per_example_outputs,
    rmia_scores,
    shadow_split,
)
from fedsim.privacy.one_run import one_run_audit
from fedsim.records import require_record
from fedsim.registry import Registry
from fedsim.rng import derive_seed, numpy_rng, torch_generator
from fedsim.server.evaluate import distribution
from fedsim.server.factory import make_strategy
from fedsim.server.loop import run_rounds

ROC_PNG = "privacy_roc.png"
INVERSION_PNG = "privacy_inversion.png"
NONMEMBERS_FROM = "participating clients' local test splits"
log = logging.getLogger("fedsim")
POPULATION_FROM = "the global test set (never trained on by the target or any shadow)"
#: RMIA population below this: a warning. An example's RMIA score is the fraction of the
#: population it dominates, so it takes at most population + 1 values; below 1,000 that grid
#: is coarser than the lowest FPR reported (0.1%), ties at the top score decide TPR at low FPR
#: (digits: 360 test images moved TPR@1% from 0.211 to 0.175), and Zarifzadeh et al.
#: use populations of thousands
RMIA_RESOLUTION = 1000

# --------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class MiaInputs:
    """What a membership attack may use: the target's per-example outputs on the pool and,
    for shadow-based attacks, the shadows' confidences and IN/OUT masks (k, n); for attacks
    that need a population (RMIA), the target's (m,) and shadows' (k, m) confidences on it.
    Confidences are LiRA's φ = log p_y − log(1 − p_y), so p_y = sigmoid(φ)."""

    losses: np.ndarray
    confidences: np.ndarray
    shadow_conf: np.ndarray | None
    shadow_in: np.ndarray | None
    fix_variance: bool
    pop_confidences: np.ndarray | None = None
    pop_shadow_conf: np.ndarray | None = None
    rmia_a: float = 0.3
    rmia_gamma: float = 1.0


MIA_ATTACKS: Registry[Callable[[MiaInputs], dict[str, np.ndarray]]] = Registry(
    "membership attack"
)


def _needs_shadows(fn: Callable) -> Callable:
    fn.needs_shadows = True  # type: ignore[attr-defined]
    return fn


def _needs_population(fn: Callable) -> Callable:
    fn.needs_population = True  # type: ignore[attr-defined]
    return fn


@MIA_ATTACKS.register("loss")
def _loss(inp: MiaInputs) -> dict[str, np.ndarray]:
    """Yeom et al. (CSF 2018): threshold on the per-example loss."""
    return {"loss": loss_attack(inp.losses)}


@MIA_ATTACKS.register("lira")
@_needs_shadows
def _lira(inp: MiaInputs) -> dict[str, np.ndarray]:
    """Carlini et al. (IEEE S&P 2022): Gaussian likelihood ratio, online and offline."""
    assert inp.shadow_conf is not None and inp.shadow_in is not None
    kw = {"fix_variance": inp.fix_variance}
    return {
        "lira_online": lira_scores(inp.confidences, inp.shadow_conf, inp.shadow_in, True, **kw),
        "lira_offline": lira_scores(inp.confidences, inp.shadow_conf, inp.shadow_in, False,
                                    **kw),
    }


@MIA_ATTACKS.register("rmia")
@_needs_shadows
@_needs_population
def _rmia(inp: MiaInputs) -> dict[str, np.ndarray]:
    """Zarifzadeh et al. (ICML 2024): offline RMIA, the shadows as OUT reference models."""
    assert inp.shadow_conf is not None and inp.shadow_in is not None
    assert inp.pop_confidences is not None and inp.pop_shadow_conf is not None
    return {"rmia": rmia_scores(expit(inp.confidences), expit(inp.shadow_conf), inp.shadow_in,
                                expit(inp.pop_confidences), expit(inp.pop_shadow_conf),
                                a=inp.rmia_a, gamma=inp.rmia_gamma)}


def needs_shadows(name: str) -> bool:
    return bool(getattr(MIA_ATTACKS.get(name, key="privacy.mia"), "needs_shadows", False))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MembershipPool:
    """Audited members (rows of ``client_train``) and non-members (rows of ``client_test``),
    equal in number per participating client, fixed by the seed."""

    clients: tuple[int, ...]
    members: dict[int, np.ndarray]
    nonmembers: dict[int, np.ndarray]

    @classmethod
    def build(cls, data: FederatedData, seed: int) -> MembershipPool:
        members, nonmembers = {}, {}
        for cid in data.participating:
            n_train, n_test = len(data.client_train(cid)[1]), len(data.client_test(cid)[1])
            k = min(n_train, n_test)
            rng = numpy_rng(seed, "privacy", "pool", cid)
            members[cid] = np.sort(rng.choice(n_train, size=k, replace=False))
            nonmembers[cid] = np.sort(rng.choice(n_test, size=k, replace=False))
        return cls(tuple(data.participating), members, nonmembers)

    def client_tensors(self, data: FederatedData | DeviceSplits, cid: int):
        """(x, y, is_member) of one client's pool: its members, then its non-members, on the
        device of ``data``'s tensors (a run's :class:`~fedsim.device.DeviceSplits`: taken
        from its device copies, no copy of the client's data per call)."""
        xtr, ytr = data.client_train(cid)
        xte, yte = data.client_test(cid)
        m = torch.as_tensor(self.members[cid], device=xtr.device)
        n = torch.as_tensor(self.nonmembers[cid], device=xte.device)
        x = torch.cat([xtr[m], xte[n]])
        y = torch.cat([ytr[m], yte[n]])
        return x, y, np.r_[np.ones(len(m), bool), np.zeros(len(n), bool)]

    def tensors(self, data: FederatedData | DeviceSplits):
        """(x, y, is_member) of the whole pool, clients in order (on ``data``'s device)."""
        parts = [self.client_tensors(data, cid) for cid in self.clients]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def shadow_masks(self, num_shadows: int, seed: int) -> dict[int, np.ndarray]:
        """Per client, the (shadows, pool size) IN mask: each example IN for half of them."""
        return {cid: shadow_split(2 * len(self.members[cid]), num_shadows,
                                  numpy_rng(seed, "privacy", "shadow-split", cid))
                for cid in self.clients}


class ShadowData:
    """The federation's data with each participating client training on chosen rows: its
    training samples outside the audit pool plus the pool samples a shadow marks IN.

    Everything else (client ids, local test splits, global test set) is the base data's.
    """

    def __init__(self, base: FederatedData, rows: dict[int, tuple[np.ndarray, np.ndarray]]):
        self.base = base
        self.rows = rows  # client -> (rows of client_train, rows of client_test)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def client_train(self, cid: int):
        if cid not in self.rows:
            return self.base.client_train(cid)
        (xtr, ytr), (xte, yte) = self.base.client_train(cid), self.base.client_test(cid)
        tr, te = (torch.as_tensor(r, dtype=torch.long) for r in self.rows[cid])
        return torch.cat([xtr[tr], xte[te]]), torch.cat([ytr[tr], yte[te]])

    @classmethod
    def for_shadow(cls, base: FederatedData, pool: MembershipPool,
                   masks: dict[int, np.ndarray], shadow: int) -> ShadowData:
        rows = {}
        for cid in pool.clients:
            k = len(pool.members[cid])
            n_train = len(base.client_train(cid)[1])
            keep = np.setdiff1d(np.arange(n_train), pool.members[cid])
            mask = masks[cid][shadow]
            rows[cid] = (np.sort(np.r_[keep, pool.members[cid][mask[:k]]]),
                         pool.nonmembers[cid][mask[k:]])
        return cls(base, rows)


def train_federation(run: RunContext, on_replies: Callable) -> ArrayRecord:
    """Train ``run``'s federation (its scenario on its data, e.g. a shadow federation's) with
    the in-process engine and the usual round loop (strategy hooks, seeded sampling),
    without server-side evaluation.

    ``on_replies(round, replies, arrays)`` sees every round, and round 0 (no replies) first.
    Flower's process-wide task identity is restored afterwards.
    """
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # as the ServerApp does
    with task_identity_restored():
        nodes = len(run.data.participating)
        client_app = make_client_app(ClientRuntime.for_run(run))
        grid = ClientOrderedGrid(InProcessGrid(client_app, nodes), nodes)
        model = run.new_model()
        arrays = model_to_record(model)
        on_replies(0, [], arrays)
        return run_rounds(make_strategy(run.scenario, model), grid, arrays, run.scenario,
                          lambda _arrays: {}, lambda _record: None, on_replies=on_replies)


# --------------------------------------------------------------------------- checks


def first_client(scenario: Scenario, data: FederatedData) -> int:
    cid = scenario.privacy.inversion_client
    return data.participating[0] if cid < 0 else cid


def check_privacy(run: RunContext) -> None:
    """Bad ``[privacy]`` input raises ScenarioError before anything trains."""
    scenario, data = run.scenario, run.data
    cfg, rounds = scenario.privacy, scenario.server.rounds
    for name in cfg.mia:
        MIA_ATTACKS.get(name, key="privacy.mia")
    test_size = len(data.global_test()[1])
    if cfg.rmia_population > test_size:
        raise ScenarioError(f"privacy.rmia_population = {cfg.rmia_population} exceeds the "
                            f"{test_size} examples of the global test set; lower it (0: all)")
    for key, value in (("client_round", cfg.client_round),
                       ("inversion_round", cfg.inversion_round)):
        if value > rounds:
            raise ScenarioError(f"privacy.{key} = {value} is out of range; the run has "
                                f"server.rounds = {rounds}")
    if cfg.canary_samples and not scenario.client.dp.enabled:
        raise ScenarioError(
            f"privacy.canary_samples = {cfg.canary_samples} inserts gradient canaries into "
            "DP-SGD, which this run does not use; set [client.dp] (noise_multiplier or "
            "target_epsilon; a tiny noise_multiplier for a run that is private in name only)")
    check_exposure(cfg.exposure, data)
    if cfg.inversion and data.input_kind != "image":
        raise ScenarioError(
            f"privacy.inversion reconstructs images from gradients, but data.name = "
            f"{scenario.data.name!r} holds text (token windows); set privacy.inversion = "
            "false (on text, measure memorization with [privacy.exposure])")
    if cfg.inversion:
        cid = first_client(scenario, data)
        if cid not in data.participating:
            why = "a holdout client (never trains)" if cid in data.holdout else "not a client"
            raise ScenarioError(
                f"privacy.inversion_client = {cid} is {why}; use a participating client id "
                f"(e.g. {data.participating[0]}) or -1")
        n = len(data.client_train(cid)[1])
        if cfg.inversion_batch > n:
            raise ScenarioError(f"privacy.inversion_batch = {cfg.inversion_batch} exceeds the "
                                f"{n} training samples of client {cid}; lower it")
        if cfg.inversion_target == "step" and scenario.client.compress != "none":
            raise ScenarioError(
                f"privacy.inversion_target = 'step' attacks one uncompressed gradient, not what "
                f"a client with client.compress = {scenario.client.compress!r} uploads; use "
                "privacy.inversion_target = 'update' (the attack on the compressed upload)")
        if cfg.inversion_target == "update" and not _inversion_plan(scenario, cid):
            raise ScenarioError(
                f"privacy.inversion_target = 'update' leaves no local step: a model with batch "
                f"statistics drops batches of one image (privacy.inversion_batch = "
                f"{cfg.inversion_batch}, client.batch_size = {scenario.client.batch_size}); "
                "raise them or use inversion_target = 'step'")


def _inversion_plan(scenario: Scenario, cid: int) -> list[torch.Tensor]:
    """The batches the attacked client trains on in ``inversion_target = "update"``: its
    ``inversion_batch`` images, as the real client batches its data in that round."""
    gen = torch_generator(scenario.seed, "client-train", scenario.privacy.inversion_round, cid)
    return plan_batches(scenario.privacy.inversion_batch, scenario.client, gen,
                        drop_singleton=uses_batch_statistics(scenario.model.norm))


# --------------------------------------------------------------------------- canaries


class SampleCanaries:
    """The server's side of the gradient canaries in DP-SGD (``privacy.canary_samples``;
    Steinke, Nasr & Jagielski, NeurIPS 2023, white-box): each canary is held by a client
    (:mod:`fedsim.client.canaries`) and is in with probability 1/2. In every round the
    server sees each sampled client's upload; a canary's score is the largest, over the
    rounds its client took part in, cosine between the client's update (what it was sent
    minus what it uploaded: DP-SGD steps *against* the canary's gradient) and the canary's
    direction, over the uploaded trainable parameters. Canaries of clients never seen score
    below any cosine. The scores and bits give the one-run lower bound
    (:func:`fedsim.privacy.one_run.one_run_audit`) of the sample-level ε."""

    def __init__(self, count: int, clients, seed: int, model: nn.Module) -> None:
        self.count, self.seed = count, seed
        self.owners = canary_owners(count, clients, seed)
        self.included = canary_bits(count, seed, SAMPLE_CANARY)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.sizes = [p.numel() for _, p in model.named_parameters() if p.requires_grad]
        self.dim = parameter_size(model)
        self.best = np.full(count, -np.inf)

    def observe(self, cid: int, upload: ArrayRecord, sent: ArrayRecord) -> None:
        mine = np.flatnonzero(self.owners == cid)
        if not mine.size:
            return
        keep = np.concatenate([np.full(n, name in upload, dtype=bool)
                               for name, n in zip(self.names, self.sizes, strict=True)])
        step = np.concatenate([(sent[k].numpy().astype(np.float64)
                                - upload[k].numpy().astype(np.float64)).ravel()
                               for k in self.names if k in upload])
        directions = unit_directions(self.dim, self.seed, SAMPLE_CANARY, mine)[:, keep]
        size = np.linalg.norm(step) * np.linalg.norm(directions, axis=1)
        cos = np.where(size > 0, directions @ step / np.where(size > 0, size, 1.0), 0.0)
        self.best[mine] = np.maximum(self.best[mine], cos)

    def audit(self, claim: AccountantClaim | None, delta: float, confidence: float) -> dict:
        seen = np.isfinite(self.best)
        scores = np.where(seen, self.best, -2.0)  # below every cosine
        out = {"unit": "sample", "canaries": self.count, "inserted": int(self.included.sum()),
               "observed": int(seen.sum()),
               "statistic": "max over the rounds its client took part in of cos(sent − "
                            "upload, u_i)",
               "accountant": None if claim is None else {
                   "epsilon": claim.epsilon, "delta": claim.delta, "from": claim.source},
               "lower_bound": None}
        if self.included.all() or not self.included.any():
            out["why_null"] = "every canary is in, or none: raise privacy.canary_samples"
            return out
        out["lower_bound"] = one_run_audit(scores, self.included, delta, confidence)
        return out


# --------------------------------------------------------------------------- the audit


class PrivacyAudit:
    """Collects what the server sees during training, then runs the configured audits.

    ``on_replies`` goes to :func:`fedsim.server.loop.run_rounds`; ``finish`` returns the
    ``privacy`` section of summary.json and writes the PNGs into ``out``.
    """

    def __init__(self, run: RunContext, out: Path, initial: ArrayRecord) -> None:
        check_privacy(run)
        scenario, data, device = run.scenario, run.data, run.device
        self.scenario, self.cfg, self.data, self.device = scenario, scenario.privacy, data, device
        self.out = Path(out)
        total = scenario.server.rounds
        self.attacks = {name: MIA_ATTACKS.get(name, key="privacy.mia") for name in self.cfg.mia}
        every = self.cfg.audit_every
        self.audit_rounds = (set(range(every, total + 1, every)) if every else set()) | {total}
        self.client_round = self.cfg.client_round or total
        self.model = run.new_model().to(device)  # scratch copy for probes
        self.on_device = run.on_device  # the run's device copies, shared with its evaluation
        self.test_xy = self.on_device.global_test()
        if self.attacks or self.cfg.client_mia:  # the membership pool, only where used
            self.pool = MembershipPool.build(data, scenario.seed)
            x, y, self.is_member = self.pool.tensors(self.on_device)
            self.pool_xy = (x, y)
        self.population_xy = self._population(self.test_xy)
        self.trained: set[int] = set()  # clients whose update was aggregated in some round
        self.canaries = (SampleCanaries(self.cfg.canary_samples, data.participating,
                                        scenario.seed, self.model)
                         if self.cfg.canary_samples else None)
        self.exposure = (ExposureAudit(self.cfg.exposure, data, scenario.seed)
                         if self.cfg.exposure.enabled else None)
        self.target: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.needs_population = any(getattr(a, "needs_population", False)
                                    for a in self.attacks.values())
        self.population: dict[int, np.ndarray] = {}  # round -> target's φ on the population
        self.final_scores: dict[str, np.ndarray] = {}
        self.client_rows: list[dict] = []
        self.leak_rows: list[dict] = []
        self.inversion_state = record_to_state(initial) if self.cfg.inversion_round == 1 else None
        self._initial = initial
        self._sent = initial

    def _population(self, test_xy):
        """RMIA's population: ``rmia_population`` examples of the global test set, fixed by
        the seed (all of it with 0)."""
        size = self.cfg.rmia_population
        x, y = test_xy
        if size == 0 or size >= len(y):
            return x, y
        rows = numpy_rng(self.scenario.seed, "privacy", "rmia-population").choice(
            len(y), size=size, replace=False)
        rows = torch.as_tensor(np.sort(rows), device=y.device)
        return x[rows], y[rows]

    # -- checkpoints ----------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """What the audit captured so far (per-round MIA outputs, client uploads' results,
        the inversion target, the last global arrays sent): checkpointed with the run, so a
        resumed run reports the same privacy results as an uninterrupted one."""
        return {"target": self.target, "population": self.population,
                "trained": sorted(self.trained), "client_rows": self.client_rows,
                "canary_best": None if self.canaries is None else self.canaries.best,
                "leak_rows": self.leak_rows, "inversion_state": self.inversion_state,
                "sent": self._sent,
                "exposure": self.exposure.state() if self.exposure is not None else None}

    def restore_state(self, state: dict) -> None:
        """Put :meth:`checkpoint_state` back (after ``--resume``)."""
        self.target = {int(k): tuple(v) for k, v in state["target"].items()}
        self.population = {int(k): v for k, v in state.get("population", {}).items()}
        self.trained = set(state.get("trained", []))
        if self.canaries is not None and state.get("canary_best") is not None:
            self.canaries.best = np.asarray(state["canary_best"])
        self.client_rows = list(state["client_rows"])
        self.leak_rows = list(state["leak_rows"])
        self.inversion_state = state["inversion_state"]
        self._sent = state["sent"]
        if self.exposure is not None and state.get("exposure") is not None:
            self.exposure.restore(state["exposure"])

    # -- during training ------------------------------------------------------------
    def _load(self, *layers) -> None:
        """The scratch model = the initial state with ``layers`` loaded on top, so arrays a
        record lacks (e.g. layers a strategy keeps local) never linger from an earlier probe."""
        load_record(self.model, self._initial)
        for arrays in layers:
            load_record(self.model, arrays)

    def _outputs(self, arrays, x, y, base=None) -> tuple[np.ndarray, np.ndarray]:
        self._load(*([base] if base is not None else []), arrays)
        return per_example_outputs(self.model, x, y)

    def on_replies(self, rnd: int, replies: list[Message], arrays: ArrayRecord) -> None:
        for msg in replies:
            if not msg.has_error():
                cid = int(require_record(msg.content, "client", ConfigRecord)["client-id"])
                self.trained.add(cid)
                if self.canaries is not None:
                    self.canaries.observe(cid, require_record(msg.content, "arrays",
                                                              ArrayRecord), self._sent)
        if self.attacks and rnd in self.audit_rounds:
            losses, conf = self._outputs(arrays, *self.pool_xy)
            with torch.no_grad():
                self.model.eval()
                acc = float((self.model(self.test_xy[0]).argmax(1) == self.test_xy[1])
                            .float().mean())
            self.target[rnd] = (losses, conf, acc)
            if self.needs_population:
                self.population[rnd] = self._outputs(arrays, *self.population_xy)[1]
        if self.exposure is not None and rnd in self.audit_rounds:
            self._load(arrays)
            self.exposure.on_global(rnd, self.model)
        if rnd == self.client_round and (self.cfg.client_mia or self.cfg.leakage
                                         or self.exposure is not None):
            for msg in replies:
                if not msg.has_error():
                    self._client_update(msg, arrays)
        if self.cfg.inversion and rnd == self.cfg.inversion_round - 1:
            self.inversion_state = record_to_state(arrays)
        self._sent = arrays

    def _client_update(self, msg: Message, global_after: ArrayRecord) -> None:
        cid = int(require_record(msg.content, "client", ConfigRecord)["client-id"])
        upload = require_record(msg.content, "arrays", ArrayRecord)
        if self.exposure is not None and cid in self.exposure.clients():
            self._load(self._sent, upload)  # the client's model as the server sees it
            self.exposure.on_upload(self.client_round, cid, self.model)
        if self.cfg.client_mia:
            x, y, is_member = self.pool.client_tensors(self.on_device, cid)
            # the client's model as the server sees it: what it sent, with the upload on top
            own = attack_metrics(loss_attack(self._outputs(upload, x, y, self._sent)[0]),
                                 is_member)
            glob = attack_metrics(loss_attack(self._outputs(global_after, x, y)[0]), is_member)
            self.client_rows.append({"client": cid, "members": int(is_member.sum()),
                                     "auc": own["auc"], "global_auc": glob["auc"]})
        if self.cfg.leakage:
            self.leak_rows.append(self._leakage(cid, record_to_state(upload),
                                                record_to_state(self._sent)))

    def _leakage(self, cid: int, state: dict, sent: dict) -> dict:
        rows = uploaded_arrays(self.model, keys=list(state))
        kinds = {k: {"arrays": 0, "values": 0} for k in KINDS}
        for row in rows:
            kinds[row["kind"]]["arrays"] += 1
            kinds[row["kind"]]["values"] += int(np.prod(row["shape"], dtype=np.int64))
        out = {"client": cid, "uploaded": {k: v for k, v in kinds.items() if v["arrays"]}}
        leaked = input_stats_from_bn(self.model, state, prev_state=sent)
        x = self.data.client_train(cid)[0].double()
        dims = [0, *range(2, x.dim())]
        true_mean, true_std = x.mean(dim=dims), x.std(dim=dims)
        if leaked is None:
            out["recovery"] = None
            return out
        if leaked.applies_to == "input":
            guess, method = leaked.mean, "direct"
        else:
            first = next(m for m in self.model.modules() if not list(m.children()))
            if not isinstance(first, nn.Conv2d):
                out["recovery"] = {"layer": leaked.module, "applies_to": leaked.applies_to,
                                   "error": f"cannot invert a first {type(first).__name__}"}
                return out
            guess, method = _mean_through_conv(first, sent, self._first_name(), leaked.mean,
                                               tuple(self.data.input_shape))
        public = self.test_xy[0].double().mean(dim=dims).cpu()
        out["recovery"] = {
            "layer": leaked.module,
            "applies_to": leaked.applies_to,
            "method": method,
            "batches": leaked.num_batches,
            "abs_error": float((guess.cpu() - true_mean).abs().mean()),
            "relative_error": float(((guess.cpu() - true_mean).abs() / true_std).mean()),
            "baseline_abs_error": float((public - true_mean).abs().mean()),
        }
        return out

    def _first_name(self) -> str:
        return next(n for n, m in self.model.named_modules() if not list(m.children()))

    # -- after training -------------------------------------------------------------
    def finish(self, arrays: ArrayRecord, accountants: tuple[AccountantClaim, ...] = ()) -> dict:
        """Run the audits after training. ``accountants``: the DP guarantees the run claims
        (:func:`fedsim.privacy.audit_epsilon.accountant_claims`); with membership attacks, the
        first one is set beside the final attack scores (``membership_epsilon``)."""
        t0 = time.perf_counter()
        result: dict = {}
        if self.attacks:
            result.update(self._membership())
            if accountants:
                result["membership_epsilon"] = membership_epsilon(
                    self.final_scores, self.is_member, accountants[0],
                    confidence=self.cfg.audit_confidence)
        if self.cfg.client_mia:
            aucs = [r["auc"] for r in self.client_rows]
            result["client_mia"] = {
                "round": self.client_round,
                "attack": "loss",
                "auc": distribution(aucs),
                "global_model_auc": distribution([r["global_auc"] for r in self.client_rows]),
                "per_client": self.client_rows,
            }
        if self.cfg.client_membership:
            result["client_membership"] = self._client_membership(arrays)
        if self.canaries is not None:
            sample = next((c for c in accountants if c.unit == "sample"), None)
            result["sample_canary_audit"] = self.canaries.audit(
                sample, self.scenario.client.dp.delta, self.cfg.audit_confidence)
        if self.cfg.leakage:
            result["leakage"] = self._leakage_summary()
        if self.cfg.inversion:
            result["inversion"] = self._inversion()
        if self.exposure is not None:
            result["exposure"] = self.exposure.summary(self.client_round)
        result["seconds"] = time.perf_counter() - t0
        return result

    def _membership(self) -> dict:
        shadow_conf, shadow_in, pop_conf, shadow_seconds = None, None, None, 0.0
        if any(getattr(a, "needs_shadows", False) for a in self.attacks.values()):
            t0 = time.perf_counter()
            shadow_conf, shadow_in, pop_conf = self._shadows()
            shadow_seconds = time.perf_counter() - t0
        by_round, final_scores = [], {}
        for rnd in sorted(self.target):
            losses, conf, acc = self.target[rnd]
            inp = MiaInputs(losses, conf, None if shadow_conf is None else shadow_conf[rnd],
                            shadow_in, self.cfg.fix_variance,
                            pop_confidences=self.population.get(rnd),
                            pop_shadow_conf=None if pop_conf is None else pop_conf[rnd],
                            rmia_a=self.cfg.rmia_a, rmia_gamma=self.cfg.rmia_gamma)
            scores: dict[str, np.ndarray] = {}
            for attack in self.attacks.values():
                scores.update(attack(inp))
            by_round.append({"round": rnd, "global_test_accuracy": acc,
                             **{k: attack_metrics(s, self.is_member) for k, s in scores.items()}})
            final_scores = scores
        self.final_scores = final_scores
        curves = {}
        for name, s in final_scores.items():
            fpr, tpr = roc_points(s, self.is_member)
            curves[name] = (fpr, tpr, by_round[-1][name]["auc"])
        plot_roc(curves, self.out / ROC_PNG, title=f"{self.scenario.name}: membership inference")
        final = by_round[-1]
        return {
            "mia": {k: v for k, v in final.items() if k not in ("round", "global_test_accuracy")},
            "mia_round": final["round"],
            "mia_by_round": by_round,
            "mia_pool": {
                "clients": len(self.pool.clients),
                "members": int(self.is_member.sum()),
                "nonmembers": int((~self.is_member).sum()),
                "members_from": "participating clients' local training samples",
                "nonmembers_from": NONMEMBERS_FROM,
                **(self._population_summary() if self.needs_population else {}),
            },
            "shadows": {"count": self.cfg.shadows, "fix_variance": self.cfg.fix_variance,
                        "reseed": self.cfg.shadow_reseed, "engine": "inprocess",
                        "seconds": shadow_seconds}
            if shadow_conf is not None else None,
            "roc_png": ROC_PNG,
        }

    def _population_summary(self) -> dict:
        size = len(self.population_xy[1])
        out = {"population": size, "population_from": POPULATION_FROM,
               "rmia_a": self.cfg.rmia_a, "rmia_gamma": self.cfg.rmia_gamma}
        if size < RMIA_RESOLUTION:
            out["population_warning"] = (
                f"RMIA's population has {size} examples: its score takes at most {size + 1} "
                f"values, coarser than the 0.1% FPR reported, so ties decide TPR at low FPR; "
                f"use privacy.rmia_population >= {RMIA_RESOLUTION} (a larger global test set)")
            log.warning("warning: privacy: %s", out["population_warning"])
        return out

    def _client_membership(self, arrays: ArrayRecord) -> dict:
        """Did this client train? The loss attack at the client level (the unit of
        client-level DP): a client's score is minus the final global model's mean loss on its
        local training data; members are the clients whose update was aggregated in some
        round, non-members the others (holdout clients and clients never sampled)."""
        clients = sorted(set(self.data.participating) | set(self.data.holdout))
        scores = np.array([-float(self._outputs(arrays, *self.on_device.client_train(c))[0]
                                  .mean()) for c in clients])
        member = np.array([c in self.trained for c in clients])
        out = {"unit": "client", "attack": "loss", "members": int(member.sum()),
               "nonmembers": int((~member).sum()),
               "members_from": "clients whose update was aggregated in some round",
               "nonmembers_from": "holdout clients and participating clients never aggregated"}
        if member.all() or not member.any():
            return {**out, "auc": None, "why_null": "every client trained, or none: raise "
                    "partition.holdout_clients for clients that never train"}
        return {**out, **attack_metrics(scores, member)}

    def _shadows(self) -> tuple[dict[int, np.ndarray], np.ndarray, dict[int, np.ndarray] | None]:
        """Train the shadow federations; their pool confidences at every audited round (and
        their population confidences, when an attack needs a population)."""
        k = self.cfg.shadows
        masks = self.pool.shadow_masks(k, self.scenario.seed)
        shadow_in = np.concatenate([masks[c] for c in self.pool.clients], axis=1)
        conf = {rnd: np.zeros((k, len(self.is_member))) for rnd in self.target}
        pop = ({rnd: np.zeros((k, len(self.population_xy[1]))) for rnd in self.target}
               if self.needs_population else None)
        for i in range(k):
            shadow = self.scenario
            if self.cfg.shadow_reseed:
                seed = derive_seed(self.scenario.seed, "privacy", "shadow", i) & 0x7FFFFFFF
                shadow = dataclasses.replace(self.scenario, seed=seed)
            data = ShadowData.for_shadow(self.data, self.pool, masks, i)

            def on_replies(rnd, _replies, arrays, i=i):
                if rnd in conf:
                    conf[rnd][i] = self._outputs(arrays, *self.pool_xy)[1]
                    if pop is not None:
                        pop[rnd][i] = self._outputs(arrays, *self.population_xy)[1]

            train_federation(RunContext(shadow, data, self.device), on_replies)
        return conf, shadow_in, pop

    def _leakage_summary(self) -> dict:
        uploaded = self.leak_rows[0]["uploaded"] if self.leak_rows else {}
        rec = [r["recovery"] for r in self.leak_rows if r["recovery"] is not None]
        summary: dict = {
            "round": self.client_round,
            "norm": self.scenario.model.norm,
            "uploaded": uploaded,
            "running_stats_uploaded": any(k in uploaded for k in ("running_mean", "running_var")),
        }
        if not rec:
            summary["data_mean_recovery"] = None
            summary["reason"] = ("no layer with running statistics among the uploaded arrays"
                                 if not summary["running_stats_uploaded"] else
                                 "the first layer with running statistics is too deep")
        elif any("error" in r for r in rec):
            summary["data_mean_recovery"] = None
            summary["reason"] = rec[0]["error"]
        else:
            summary["data_mean_recovery"] = {
                "layer": rec[0]["layer"],
                "applies_to": rec[0]["applies_to"],
                "method": rec[0]["method"],
                "clients": len(rec),
                "abs_error": float(np.mean([r["abs_error"] for r in rec])),
                "relative_error": float(np.mean([r["relative_error"] for r in rec])),
                "baseline_abs_error": float(np.mean([r["baseline_abs_error"] for r in rec])),
            }
        return summary

    def _inversion(self) -> dict:
        cfg = self.cfg
        self._load(self.inversion_state)
        model = copy.deepcopy(self.model)
        cid = first_client(self.scenario, self.data)
        x_all, y_all = self.on_device.client_train(cid)
        rows = numpy_rng(self.scenario.seed, "privacy", "inversion-batch", cid).choice(
            len(y_all), size=cfg.inversion_batch, replace=False)
        rows = torch.as_tensor(np.sort(rows), device=y_all.device)
        x, y = x_all[rows], y_all[rows]
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ScenarioError("privacy.inversion needs a model whose classifier is "
                                "`model.head` (nn.Linear), as every fedsim arch has")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        lo = float(self.test_xy[0].min())
        hi = float(self.test_xy[0].max())
        common = dict(steps=cfg.inversion_steps, lr=cfg.inversion_lr,
                      tv_weight=cfg.inversion_tv, seed=self.scenario.seed, bn_mode=cfg.bn_mode,
                      bounds=(lo, hi), bn_weight=cfg.bn_prior_weight,
                      restarts=cfg.inversion_restarts)
        if cfg.inversion_target == "update":
            x, y, labels, recon, extra = self._invert_update(model, cid, x, y, names, common)
        else:
            grads = client_gradient(model, x, y, bn_mode=cfg.bn_mode)
            g_w = grads[names.index("head.weight")]
            g_b = grads[names.index("head.bias")] if "head.bias" in names else None
            labels = recover_labels(g_w, g_b, num_images=len(y))
            bn_stats = (_uploaded_batch_stats(model, x)
                        if cfg.bn_buffers_shared and cfg.bn_mode == "train" else {})
            recon = invert_gradients(
                model, grads, labels, tuple(self.data.input_shape), num_images=len(y),
                bn_stats=bn_stats or None, **common)
            extra = {"local_steps": 1, "bn_prior_layers": len(bn_stats),
                     "attacker_knows": "the sent model and one batch's gradient (up to scale)"}
        metrics = image_metrics(x.cpu(), recon.x.cpu(), data_range=hi - lo)
        matched, _ = match_reconstructions(x.cpu(), recon.x.cpu())
        save_image_grid(x.cpu(), matched, self.out / INVERSION_PNG, bounds=(lo, hi))
        true_counts = np.bincount(y.cpu().numpy(), minlength=self.data.num_classes)
        got_counts = np.bincount(labels.cpu().numpy(), minlength=self.data.num_classes)
        return {
            "round": cfg.inversion_round,
            "client": cid,
            "target": cfg.inversion_target,
            "batch_size": len(y),
            "local_steps": extra["local_steps"],
            "bn_mode": cfg.bn_mode,
            "bn_buffers_shared": cfg.bn_buffers_shared,
            "bn_prior_layers": extra["bn_prior_layers"],
            "psnr_db": metrics["psnr"],
            "ssim": metrics["ssim"],
            "mse": metrics["mse"],
            "label_accuracy": float(np.minimum(true_counts, got_counts).sum() / len(y)),
            "steps": cfg.inversion_steps,
            "restarts": cfg.inversion_restarts,
            "restart_objectives": list(recon.losses),
            "chosen_restart": recon.best,
            "objective": recon.loss,
            "attacker_knows": extra["attacker_knows"],
            "png": INVERSION_PNG,
        }

    def _invert_update(self, model: nn.Module, cid: int, x: torch.Tensor, y: torch.Tensor,
                       names: list[str], common: dict):
        """Attack the real upload of ``τ`` local steps on the ``N = inversion_batch`` images.

        The client trains for real (``train_local``, plain SGD without strategy hooks, BN in
        ``privacy.bn_mode``) with the batches of :func:`_inversion_plan`. The attacker knows
        the sent model, the client's lr, momentum and weight decay, N, and which images form
        each batch in order (so τ and the batch size); it reads the labels off the update's
        classifier rows and matches its simulated update (and, if shared, BN buffers).
        """
        cfg, client = self.cfg, self.scenario.client
        # The local dataset lists its images by label, so the (sorted) recovered labels name
        # the image at each position the batch plan refers to.
        order = torch.argsort(y, stable=True)  # integer labels: the same order on any device
        x, y = x[order], y[order]
        plan = _inversion_plan(self.scenario, cid)
        real = copy.deepcopy(model)
        gen = torch_generator(self.scenario.seed, "client-train", cfg.inversion_round, cid)
        train_local(real, x, y, client, gen, [_EvalBN()] if cfg.bn_mode == "eval" else [],
                    drop_singleton=uses_batch_statistics(self.scenario.model.norm))
        after = dict(real.named_parameters())
        update = [(p - after[n]).detach() for n, p in model.named_parameters()
                  if p.requires_grad]
        if client.compress != "none":  # the attacker sees what is uploaded: the decoded update
            trained = as_uploaded([-u for u in update], client, self.scenario.seed,
                                  cfg.inversion_round, cid)
            update = [-d for d in trained]
        u_b = update[names.index("head.bias")] if "head.bias" in names else None
        labels = recover_labels(update[names.index("head.weight")], u_b, num_images=len(y))
        buffers = ({n: (m.running_mean.detach(), m.running_var.detach())
                    for n, m in real.named_modules() if n and has_running_stats(m)}
                   if cfg.bn_buffers_shared and cfg.bn_mode == "train" else {})
        recon = invert_update(model, update, labels, tuple(self.data.input_shape), plan,
                              client.lr, client.momentum, client.weight_decay,
                              bn_buffers=buffers or None, **common)
        extra = {"local_steps": len(plan), "bn_prior_layers": len(buffers),
                 "attacker_knows": "the sent model; the client's lr, momentum and weight decay; "
                                   "its N images' batch assignment in order (tau steps); "
                                   + ("its uploaded BN buffers" if buffers else "no BN buffers")
                                   + (f"; the update as uploaded ({client.compress}-compressed)"
                                      if client.compress != "none" else "")}
        return x, y, labels, recon, extra


class _EvalBN(ClientHook):
    """Keeps the attacked client's model in eval mode (``privacy.bn_mode = "eval"``: BN uses
    its running statistics and leaves them unchanged)."""

    def __init__(self) -> None:
        pass

    def before_train(self, model: nn.Module) -> None:
        model.eval()


def _uploaded_batch_stats(model: nn.Module, x: torch.Tensor) -> dict:
    """What a train-mode step uploads in BN buffers, inverted back to the batch statistics
    at each BN layer's input (exact after one batch, see ``recover_batch_stats``)."""
    stepped = copy.deepcopy(model).train()
    with torch.no_grad():
        stepped(x)
    before = dict(model.named_modules())
    stats = {}
    for name, module in stepped.named_modules():
        if not has_running_stats(module) or not name:
            continue
        prev = before[name]
        stats[name] = recover_batch_stats(
            module.running_mean, module.running_var, getattr(module, "momentum", 0.1),
            num_batches=1, prev_mean=prev.running_mean, prev_var=prev.running_var,
            prev_num_batches=round(float(prev.num_batches_tracked)),
        )
    return stats


def _mean_through_conv(conv: nn.Conv2d, state: dict, name: str, out_mean: torch.Tensor,
                       input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """Per-channel input mean from the per-channel mean of a first conv's output.

    The output mean is linear in the means of the zero-padded input under each kernel tap:
    ``mean_out[o] = b[o] + Σ_{i,u,v} W[o,i,u,v] · μ[i,u,v]``. For a stride-1 conv with "same"
    padding and at least as many output channels as taps, ``"taps"`` solves for every ``μ`` by
    least squares and reads the centre tap, whose mean is exactly the image mean. Otherwise
    ``"constant"`` assumes each input channel constant (``μ[i,u,v]`` = its mean, zero padding
    included), an approximation. Both use the conv weights the server sent (those of the
    client's first local batch), so they are exact for one batch and approximate after more.
    """
    c, h, w = input_shape
    weight = state[f"{name}.weight"].double()
    bias = state.get(f"{name}.bias")
    rhs = out_mean.double() - (bias.double() if bias is not None else 0.0)
    out_ch, _, kh, kw = weight.shape
    same = (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and kh % 2 == 1 and kw % 2 == 1 and conv.padding == (kh // 2, kw // 2))
    if same and out_ch >= c * kh * kw:
        taps = torch.linalg.lstsq(weight.reshape(out_ch, -1), rhs[:, None]).solution[:, 0]
        return taps.reshape(c, kh, kw)[:, kh // 2, kw // 2], "taps"
    ones = torch.eye(c, dtype=torch.float64)[:, :, None, None].expand(c, c, h, w)
    resp = F.conv2d(ones, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    a = resp.mean(dim=(2, 3)).T  # (out channels, in channels)
    return torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0], "constant"
