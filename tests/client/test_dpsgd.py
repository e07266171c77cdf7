"""``[client.dp]``: DP-SGD's per-sample clipping, noise, refusals and per-client ε."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fedsim
from fedsim.client import dpsgd
from fedsim.config import ClientConfig, ClientDPConfig, ScenarioError, load_scenario
from fedsim.data.federated import build_federated_data
from fedsim.models import build_model, dp_sgd
from fedsim.privacy.accountant import epsilon
from fedsim.run import check

QUICKSTART = "scenarios/quickstart.toml"
DP = ["client.dp.noise_multiplier=1.0", "client.dp.max_grad_norm=1.0"]


def _model_and_batch(norm: str, n: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("cnn", norm, in_channels=1, image_size=8, num_classes=10,
                        width=8, groups=4).double().train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    params = {k: p.detach() for k, p in model.named_parameters()}
    return model, params, x, y


@pytest.mark.parametrize("norm", ["gn", "in", "ln", "none"])
def test_no_clipped_per_sample_gradient_exceeds_the_bound(norm):
    model, params, x, y = _model_and_batch(norm)
    grads, _, _ = dp_sgd.per_sample_grads(model, params, {}, x, y)
    norms = dp_sgd.per_sample_norms(grads)
    for c in (1e-3, 0.5, 1e3):  # all clipped / some / none
        clipped = dp_sgd.clip_factors(norms, c) * norms
        assert (clipped <= c).all()
        small = norms < c  # a gradient already inside the ball is (nearly) untouched
        assert torch.allclose(clipped[small], norms[small], rtol=c * 1e-6 / norms.min())
    # the clipped norms are those of the clipped gradients themselves
    factor = dp_sgd.clip_factors(norms, 1e-3)
    scaled = {k: g * factor.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}
    assert (dp_sgd.per_sample_norms(scaled) <= 1e-3).all()


@pytest.mark.parametrize("norm", ["gn", "in", "ln"])
def test_clipped_sum_equals_a_naive_per_sample_loop_without_noise(norm):
    """σ = 0: vmap(grad) + clipping equals autograd on each sample alone (float64)."""
    model, params, x, y = _model_and_batch(norm)
    c = 0.5
    grads, losses, _ = dp_sgd.per_sample_grads(model, params, {}, x, y)
    summed, _ = dp_sgd.clip_and_sum(grads, c)
    out = dp_sgd.privatize(summed, 0.0, c, 3.5, torch.Generator().manual_seed(0))
    want = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(len(x)):
        model.zero_grad()
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        assert loss.item() == pytest.approx(losses[i].item(), rel=1e-12)
        loss.backward()
        g = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        norm_i = math.sqrt(sum((v**2).sum().item() for v in g.values()))
        factor = min(1.0, c / (norm_i + dp_sgd.CLIP_EPS))
        for k in want:
            want[k] += factor * g[k]
    for k in want:  # float64: a few ulps of the sums of ~100 products
        torch.testing.assert_close(out[k], want[k] / 3.5, rtol=1e-10, atol=1e-12)


def test_noise_has_std_sigma_times_c_over_expected_batch():
    sigma, c, expected = 1.3, 0.7, 4.0
    n = 200_000
    zero = {"a": torch.zeros(n // 2), "b": torch.zeros(n // 4, 2)}
    out = dp_sgd.privatize(zero, sigma, c, expected, torch.Generator().manual_seed(1))
    noise = torch.cat([v.flatten() for v in out.values()]).double() * expected
    std = sigma * c
    # the sample std's standard error is std / sqrt(2n); the mean's is std / sqrt(n)
    assert noise.std().item() == pytest.approx(std, abs=5 * std / math.sqrt(2 * n))
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)


@pytest.mark.parametrize("std", [0.9, 0.0])
def test_noise_is_one_torch_normal_per_tensor_in_order(std):
    """The noise of one buffer and one copy is bitwise the stream of one ``torch.normal``
    per tensor (what a seed gave before): tensors below 16 values, not multiples of 16
    (the CPU kernel's tail), 0-d and another dtype in between, and the generator ends in
    the same state."""
    shapes = [(8, 1, 3, 3), (8,), (), (16,), (17,), (5, 7), (32, 33), (10,), (1,), (48,)]
    g = torch.Generator().manual_seed(3)
    like = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    like["f64"] = torch.randn(7, 3, dtype=torch.float64, generator=g)
    like["last"] = torch.randn(20, generator=g)
    mine, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(2):  # the second step continues the stream
        out = dp_sgd.privatize(like, std, 1.5, 4.0, mine)
        for k, s in like.items():
            noise = (torch.normal(0.0, std * 1.5, s.shape, generator=ref, dtype=s.dtype)
                     if std > 0 else torch.zeros_like(s))
            want = (s + noise) / 4.0
            assert out[k].dtype == want.dtype and torch.equal(out[k], want), k
    assert torch.equal(mine.get_state(), ref.get_state())


def test_noise_reaches_another_device_in_one_copy_per_dtype(monkeypatch):
    """Tensors on another device than the generator's ("meta" stands in for an accelerator)
    get their noise in one host-to-device copy per dtype, in their shapes and dtypes, from
    the same draws (the generator advances as one draw per tensor does)."""
    like = {"w": torch.zeros(3, 4, device="meta"), "b": torch.zeros(5, device="meta"),
            "d": torch.zeros(2, dtype=torch.float64, device="meta"),
            "s": torch.zeros((), device="meta")}
    copies = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if out.device != self.device:
            copies.append(self.dtype)
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    mine, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = dp_sgd.gaussian_noise(like, 1.0, mine)
    for k, t in like.items():
        torch.normal(0.0, 1.0, t.shape, generator=ref, dtype=t.dtype)
        assert noise[k].device == t.device and noise[k].shape == t.shape
        assert noise[k].dtype == t.dtype
    assert sorted(copies, key=str) == [torch.float32, torch.float64]
    assert torch.equal(mine.get_state(), ref.get_state())


def test_poisson_plan_and_batches():
    cfg = ClientConfig(batch_size=16, epochs=2)
    assert dpsgd.plan(50, cfg) == dpsgd.DPSGDPlan(16 / 50, 2 * 4)  # 2 × ceil(50 / 16)
    assert dpsgd.plan(10, cfg) == dpsgd.DPSGDPlan(1.0, 2)
    assert dpsgd.plan(50, ClientConfig(batch_size=16, local_steps=5)).steps == 5
    g = torch.Generator().manual_seed(0)
    sizes = [len(dp_sgd.poisson_batch(1000, 0.1, g)) for _ in range(200)]
    mean = sum(sizes) / len(sizes)  # Binomial(1000, 0.1): mean 100, std 9.5
    assert mean == pytest.approx(100, abs=5 * 9.5 / math.sqrt(200))


def test_empty_poisson_batches_still_add_noise(monkeypatch):
    model, _, x, y = _model_and_batch("gn", n=3)
    cfg = ClientConfig(batch_size=1, local_steps=3, lr=0.1,
                       dp=ClientDPConfig(noise_multiplier=1.0))
    assert dpsgd.train_dpsgd(model, x[:0], y[:0], cfg, 1.0,
                             torch.Generator().manual_seed(0)).steps == 0  # no data: no step
    monkeypatch.setattr(dp_sgd, "poisson_batch", lambda n, q, g: torch.zeros(0, dtype=torch.long))
    before = [p.detach().clone() for p in model.parameters()]
    result = dpsgd.train_dpsgd(model, x, y, cfg, 1.0, torch.Generator().manual_seed(0))
    assert result.steps == 3 and result.loss == 0.0  # finite: the server keeps the update
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_dpsgd_steps_with_fedprox_and_canaries_equal_a_hand_reference():
    """Two DP-SGD steps on one client with FedProx's proximal term and two gradient
    canaries, against the mechanism written out by hand (float64): per step a Poisson
    batch, each sample's gradient on its own clipped to C and summed, the canaries that
    join (C·u each), then N(0, σ²C²) per coordinate, all from the client's generator in
    that order, over the expected batch q·n; then the proximal gradient μ(w − w₀),
    unclipped; then SGD."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsim.client.hooks import HookContext, ProximalHook

    model, params, x, y = _model_and_batch("gn", n=7)
    sigma, c, mu, lr = 0.8, 0.5, 0.3, 0.1
    cfg = ClientConfig(batch_size=3, local_steps=2, lr=lr,
                       dp=ClientDPConfig(noise_multiplier=sigma, max_grad_norm=c))
    dim = sum(p.numel() for p in params.values())
    g = torch.Generator().manual_seed(4)
    canaries = torch.randn(2, dim, generator=g, dtype=torch.float64)
    canaries /= canaries.norm(dim=1, keepdim=True)
    ref = {k: v.clone() for k, v in params.items()}
    w0 = {k: v.clone() for k, v in params.items()}
    q, gen = 3 / 7, torch.Generator().manual_seed(9)
    for _ in range(2):
        idx = (torch.rand(7, generator=gen) < q).nonzero().squeeze(1)
        summed = {k: torch.zeros_like(v) for k, v in ref.items()}
        for i in idx.tolist():
            w = {k: v.clone().requires_grad_() for k, v in ref.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, w, (x[i : i + 1],)),
                                   y[i : i + 1])
            grads = torch.autograd.grad(loss, list(w.values()))
            norm_i = math.sqrt(sum((v**2).sum().item() for v in grads))
            factor = min(1.0, c / (norm_i + dp_sgd.CLIP_EPS))
            for k, gk in zip(w, grads):
                summed[k] += factor * gk
        joins = (torch.rand(2, generator=gen) < q).double()
        flat = c * (joins @ canaries)
        for (k, v), part in zip(summed.items(), flat.split([v.numel() for v in ref.values()])):
            summed[k] = v + part.view(v.shape)
        for k in ref:
            noise = torch.normal(0.0, sigma * c, ref[k].shape, generator=gen,
                                 dtype=torch.float64)
            step = (summed[k] + noise) / (q * 7) + mu * (ref[k] - w0[k])
            ref[k] = ref[k] - lr * step
    hook = ProximalHook(HookContext(0, ConfigRecord({"proximal-mu": mu}), RecordDict()))
    result = dpsgd.train_dpsgd(model, x, y, cfg, sigma, torch.Generator().manual_seed(9),
                               [hook], canaries)
    assert result.steps == 2
    for k, p in model.named_parameters():  # float64: a few ulps of ~100-term sums
        torch.testing.assert_close(p.detach(), ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["bn", "hybrid"])
def test_batch_statistics_are_refused_with_the_reason(norm):
    with pytest.raises(ScenarioError) as err:
        check(load_scenario(QUICKSTART, [*DP, f"model.norm={norm}"]))
    msg = str(err.value)
    assert "depends on the other samples in its batch" in msg
    assert 'model.norm = "gn"' in msg


def test_vectorized_cohorts_run_dpsgd():
    """DP-SGD is no longer refused with ``engine.vectorize``: the cohort nests per-sample
    gradients (tests/engine/test_vectorized.py checks it against one client at a time)."""
    check(load_scenario(QUICKSTART, [*DP, "model.norm=gn", "engine.vectorize=true"]))


def test_config_needs_one_of_sigma_and_target():
    assert not ClientDPConfig().enabled
    assert ClientDPConfig(target_epsilon=2.0).enabled
    with pytest.raises(ScenarioError, match="both set"):
        ClientDPConfig(noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ScenarioError, match="max_grad_norm"):
        ClientDPConfig(noise_multiplier=1.0, max_grad_norm=0.0)


def test_calibrated_noise_spends_the_target():
    q, steps, delta = 0.2, 40, 1e-5
    sigma = dpsgd.calibrate_noise(3.0, q, steps, delta)
    assert dpsgd.client_epsilon(sigma, q, steps, delta) <= 3.0
    assert dpsgd.client_epsilon(sigma * 0.99, q, steps, delta) > 3.0


def test_quickstart_with_dpsgd_reports_each_clients_epsilon(tmp_path):
    """2 rounds, GN: each client's ε is the accountant's for the steps of the rounds it joined."""
    out = tmp_path / "run"
    scenario = load_scenario(QUICKSTART, [*DP, "server.rounds=2", "model.norm=gn"])
    fedsim.run(scenario, out=out)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in rounds if r["round"] >= 1]
    data = build_federated_data(scenario)
    joined: dict[int, int] = {}
    for r in trained:
        for cid in r["clients"]:
            joined[cid] = joined.get(cid, 0) + 1
        eps = r["client_dp"]["epsilon"]
        assert set(eps) == {str(c) for c in r["clients"]}
        assert r["client_dp_epsilon_max"] == max(eps.values())
        for cid in r["clients"]:
            schedule = dpsgd.plan(len(data.client_train(cid)[1]), scenario.client)
            want = epsilon(1.0, schedule.sampling_rate, joined[cid] * schedule.steps,
                           1e-5).value
            assert eps[str(cid)] == pytest.approx(want, rel=1e-12)
    assert max(joined.values()) == 2  # some client took part twice: composition is tested
    summary = json.loads((out / "summary.json").read_text())["client_dp"]
    latest = {}
    for r in trained:
        latest.update(r["client_dp"]["epsilon"])
    assert summary["epsilon"]["max"] == pytest.approx(max(latest.values()))
    assert summary["epsilon"]["mean"] == pytest.approx(sum(latest.values()) / len(latest))
    assert summary["epsilon"]["clients"] == len(joined)
    assert summary["noise_multiplier"] == {"min": 1.0, "max": 1.0}
    assert summary["max_grad_norm"] == 1.0 and summary["delta"] == 1e-5
    assert 0 < summary["sampling_rate"]["min"] <= summary["sampling_rate"]["max"] <= 1
