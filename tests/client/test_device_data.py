"""The per-run device copies of client data (fedsim.device.DeviceData)."""

import torch

from fedsim.device import DeviceData


def _host(n: int):
    calls = []

    def make():
        calls.append(n)
        return torch.zeros((n, 4)), torch.zeros(n, dtype=torch.long)
    return make, calls


def test_cpu_returns_the_host_tensors_and_keeps_nothing():
    make, calls = _host(3)
    data = DeviceData(torch.device("cpu"))
    x, _ = make()
    assert data.get(("train", 0), lambda: (x, x))[0] is x
    assert not data._items


def test_a_device_copy_is_made_once_and_reused():
    # "meta" stands in for an accelerator: .to() makes a new tensor, as a copy to CUDA does
    data = DeviceData(torch.device("meta"))
    make, calls = _host(3)
    first = data.get(("train", 7), make)
    again = data.get(("train", 7), make)
    assert first[0].device.type == "meta" and again[0] is first[0] and calls == [3]


def test_the_byte_bound_evicts_the_least_recently_used_client():
    per_client = 3 * 4 * 4 + 3 * 8  # float32 x (3, 4) and int64 y (3,)
    data = DeviceData(torch.device("meta"), max_bytes=2 * per_client)
    make, calls = _host(3)
    for cid in (0, 1, 0, 2):  # 0 was used after 1, so 1 leaves when 2 arrives
        data.get(("train", cid), make)
    assert list(data._items) == [("train", 0), ("train", 2)]
    assert data._bytes == 2 * per_client
    data.get(("train", 1), make)  # made again
    assert len(calls) == 4


def test_a_client_larger_than_the_bound_is_copied_but_not_kept():
    data = DeviceData(torch.device("meta"), max_bytes=10)
    make, calls = _host(3)
    x, _ = data.get(("test", 0), make)
    assert x.device.type == "meta" and not data._items
