"""Whether Ray can run a scenario where it is asked to, found before anything is written.

A Ray setting that cannot work does not fail on its own: Flower's simulation waits for an
actor pool that can never be placed, and ``ray.init`` retries an address nobody serves
forever (and swallows SIGTERM meanwhile). So preflight (:func:`fedsim.engine.check_engine`)
asks first, within fixed bounds:

- **This machine** (``engine.ray_address`` empty): a client actor needs
  ``engine.ray_num_cpus`` CPUs and ``engine.client_gpus`` of a CUDA GPU, and Ray cohorts
  need ``engine.ray_workers`` of them at once; a local Ray has ``os.cpu_count()`` CPUs and
  the GPUs torch sees.
- **A cluster**: the address must parse (:func:`fedsim.config.parse_ray_address`, at load
  time), its port must accept a TCP connection within :data:`PROBE_TIMEOUT` seconds (name
  lookup included), and a short-lived child process must join it with ``ray.init`` and list
  its live nodes within :data:`CONNECT_TIMEOUT` seconds (a child, because ``ray.init``
  cannot be interrupted: the child is killed at the bound). The nodes are then checked like
  this machine: one actor must fit on one node, cohort actors on the cluster's total. The
  answer is kept for the process, so a sweep asks once per address.

Every refusal is a :class:`~fedsim.errors.ScenarioError` naming the key and the fix.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from fedsim.config import EngineConfig, parse_ray_address
from fedsim.errors import ScenarioError

#: seconds for the TCP connect to a cluster's address, its name lookup included
PROBE_TIMEOUT = 5.0
#: seconds for a child process to join the cluster and list its nodes
CONNECT_TIMEOUT = 30.0
#: the line the child prints its answer on (Ray may print other lines)
_ANSWER = "fedsim-ray-nodes:"
_CHILD = f"""
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
nodes = [n.get("Resources", {{}}) for n in ray.nodes() if n.get("Alive")]
print({_ANSWER!r} + json.dumps(nodes), flush=True)
ray.shutdown()
"""

_known: dict[str, list[dict[str, float]]] = {}


def check_ray(cfg: EngineConfig, local_cpus: int | None = None,
              local_gpus: int | None = None) -> None:
    """Refuse (ScenarioError) Ray settings this machine or the cluster at
    ``cfg.ray_address`` cannot run; see the module docstring for the bounds."""
    if cfg.ray_address:
        nodes = cluster_nodes(cfg.ray_address)
        where = f"the Ray cluster at {cfg.ray_address}"
    else:
        nodes = [{"CPU": float(local_cpus if local_cpus is not None else os.cpu_count() or 1),
                  "GPU": float(local_gpus if local_gpus is not None else _cuda_devices())}]
        where = "this machine"
    check_resources(cfg, nodes, where)


def _cuda_devices() -> int:
    import torch  # already loaded by any run that gets here

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(cfg: EngineConfig, nodes: list[dict[str, float]], where: str) -> None:
    """One client actor (``engine.ray_num_cpus`` CPUs, ``engine.client_gpus`` GPU) must fit on
    one of ``nodes``; with ``engine.vectorize``, ``engine.ray_workers`` of them on all."""
    cpus, gpus = cfg.ray_num_cpus, cfg.client_gpus
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    fix = ("set engine.client_gpus = 0, or engine.ray_address to a cluster with GPUs"
           if not cfg.ray_address else "set engine.client_gpus = 0 or use a cluster with GPUs")
    if gpus > 0 and total_gpus == 0:
        raise ScenarioError(f"engine.client_gpus = {gpus:g} but {where} has no GPU; {fix}")
    if not any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        most = max(nodes, key=lambda n: (n.get("CPU", 0.0), n.get("GPU", 0.0)), default={})
        has = f"{most.get('CPU', 0.0):g} CPUs and {most.get('GPU', 0.0):g} GPUs"
        has = (f"no node of {where} has that much (the largest: {has})" if cfg.ray_address
               else f"{where} has {has}")
        raise ScenarioError(
            f"one Ray client actor needs engine.ray_num_cpus = {cpus:g} CPUs"
            + (f" and engine.client_gpus = {gpus:g} GPU" if gpus else "")
            + f", but {has}; lower engine.ray_num_cpus" + (" or engine.client_gpus" if gpus
                                                          else ""))
    if not cfg.vectorize:
        return
    need = {"CPU": cfg.ray_workers * cpus, "GPU": cfg.ray_workers * gpus}
    for kind, amount in need.items():
        have = sum(n.get(kind, 0.0) for n in nodes)
        if amount > have + 1e-9:
            raise ScenarioError(
                f"engine.ray_workers = {cfg.ray_workers} actors × engine.ray_num_cpus = "
                f"{cpus:g} CPUs and engine.client_gpus = {gpus:g} GPU need {amount:g} "
                f"{kind}s, but {where} has {have:g}; lower engine.ray_workers or the "
                "per-actor resources" + ("" if cfg.ray_address else
                                         ", or set engine.ray_address to a cluster"))


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Refuse an address whose port does not accept a TCP connection within ``timeout``
    seconds (name lookup included: it runs in a thread, since ``getaddrinfo`` has no
    timeout of its own)."""
    host, port = parse_ray_address(address)
    deadline = time.monotonic() + timeout
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=lookup, name="fedsim-ray-lookup", daemon=True)
    worker.start()
    worker.join(timeout)
    if not found:
        raise _unreachable(address, f"the name {host!r} did not resolve within {timeout:g} s")
    if isinstance(found[0], OSError):
        raise _unreachable(address, f"the name {host!r} does not resolve ({found[0]})")
    errors = []
    for family, kind, proto, _, sockaddr in found[0]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with socket.socket(family, kind, proto) as s:
            s.settimeout(left)
            try:
                s.connect(sockaddr)
                return
            except OSError as exc:
                errors.append(f"{sockaddr[0]}:{sockaddr[1]}: {exc.strerror or exc}")
    why = "; ".join(errors) or f"no answer within {timeout:g} s"
    raise _unreachable(address, f"nothing accepts a connection there ({why})")


def _unreachable(address: str, why: str) -> ScenarioError:
    return ScenarioError(
        f"engine.ray_address = {address!r}: {why}; start the cluster (ray start --head "
        "--port=6379 on its head node) or fix the address (host:port of the head node's GCS)")


def cluster_nodes(address: str, timeout: float = CONNECT_TIMEOUT) -> list[dict[str, float]]:
    """The resources of the cluster's live nodes (``ray.nodes()``), asked by a child process
    that must join within ``timeout`` seconds; kept for the rest of this process."""
    if address in _known:
        return _known[address]
    if address != "auto":
        probe(address)
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, address], capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ScenarioError(
            f"engine.ray_address = {address!r}: something answers there, but Ray did not "
            f"join it within {timeout:g} s; is it the head node's GCS port (ray start "
            "--head --port=PORT), and the same Ray version?") from None
    answer = [line[len(_ANSWER):] for line in done.stdout.splitlines()
              if line.startswith(_ANSWER)]
    if done.returncode != 0 or not answer:
        last = [line for line in done.stderr.splitlines() if line.strip()]
        why = last[-1].strip() if last else f"exit code {done.returncode}"
        raise ScenarioError(f"engine.ray_address = {address!r}: Ray could not join the "
                            f"cluster ({why}); check the address and that the cluster runs")
    nodes = [{k: float(v) for k, v in node.items() if isinstance(v, (int, float))}
             for node in json.loads(answer[-1])]
    _known[address] = nodes
    return nodes
