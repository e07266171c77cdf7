"""The client computation's pieces: the SGD update against torch.optim.SGD, start arrays."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.arrays import state_to_record
from fedsim.client.hooks import HookContext, ProximalHook
from fedsim.client.step import ClientArrays
from fedsim.models.sgd_step import SGD, HookTerms, eval_sums, hook_loss


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2),
                                                   (0.0, 1e-2)])
def test_sgd_update_equals_torch_optim_sgd_step_by_step(momentum, weight_decay):
    """Same arithmetic as torch.optim.SGD (first momentum buffer = the gradient, weight decay
    added to the gradient), so the parameters agree exactly after every step."""
    g = torch.Generator().manual_seed(0)
    ref = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    params = {k: v.clone() for k, v in ref.items()}
    leaves = [v.clone().requires_grad_() for v in ref.values()]
    opt = torch.optim.SGD(leaves, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    sgd, buffers = SGD(0.05, momentum, weight_decay), {}
    for _ in range(4):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
        for leaf, grad in zip(leaves, grads.values()):
            leaf.grad = grad.clone()
        opt.step()
        params = sgd.update(params, grads, buffers)
        for leaf, key in zip(leaves, ref):
            assert torch.equal(params[key], leaf.detach()), key
    in_place = {k: v.clone() for k, v in ref.items()}
    same = sgd.update(in_place, {k: torch.ones_like(v) for k, v in ref.items()}, {},
                      in_place=True)
    assert all(same[k] is in_place[k] for k in ref)


def test_stacked_update_equals_each_client_alone():
    """The cohort applies the update to parameters stacked along dim 0: row i equals the
    update of client i alone."""
    g = torch.Generator().manual_seed(1)
    stacked = {"w": torch.randn(3, 4, 2, generator=g)}
    sgd = SGD(0.1, 0.9, 1e-3)
    mom_stacked, mom_rows = {}, [{} for _ in range(3)]
    rows = [{"w": stacked["w"][i].clone()} for i in range(3)]
    for _ in range(3):
        grads = {"w": torch.randn(3, 4, 2, generator=g)}
        stacked = sgd.update(stacked, grads, mom_stacked)
        rows = [sgd.update(r, {"w": grads["w"][i]}, m) for i, (r, m) in
                enumerate(zip(rows, mom_rows))]
    for i in range(3):
        assert torch.equal(stacked["w"][i], rows[i]["w"])


def test_proximal_term_is_a_pure_function_of_params_and_state():
    start = {"w": torch.tensor([1.0, 2.0])}
    hook = ProximalHook(HookContext(0, ConfigRecord({"proximal-mu": 0.5}), RecordDict()))
    terms = HookTerms([hook], start)
    params = {"w": torch.tensor([2.0, 0.0])}
    # (mu / 2) * ||w - w0||^2 = 0.25 * (1 + 4)
    assert hook_loss(terms.active_hooks, params, terms.active_states).item() == 1.25
    off = ProximalHook(HookContext(0, ConfigRecord({"proximal-mu": 0.0}), RecordDict()))
    assert not HookTerms([off], start)  # mu = 0 adds nothing to the step


def test_client_arrays_read_overrides_as_the_model_would_load_them():
    base = {"w": torch.zeros(2, 2), "n": torch.tensor(0)}
    arrays = ClientArrays(base)
    arrays.load(state_to_record({"w": torch.arange(4.0), "n": torch.tensor(2.6)}))
    assert torch.equal(arrays["w"], torch.arange(4.0).reshape(2, 2))
    assert arrays["n"].dtype == torch.int64 and arrays["n"].item() == 3
    assert base["w"].sum() == 0  # the shared start is never written
    with pytest.raises(KeyError, match="does not belong"):
        arrays["nope"] = np.zeros(1)


def test_eval_sums_leave_padding_out():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])
    y = torch.tensor([[0, 0, 1]])
    loss, hit = eval_sums(logits, y, torch.tensor([[True, True, False]]))
    expected = sum(torch.nn.functional.cross_entropy(logits[0, :2], y[0, :2],
                                                     reduction="none").double())
    assert hit.tolist() == [1] and loss.item() == pytest.approx(expected.item(), rel=1e-12)
