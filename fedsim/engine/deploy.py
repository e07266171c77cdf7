"""Flower's Deployment Engine on this machine: a SuperLink, N SuperNodes and ``flwr run``.

The same ServerApp and ClientApp (``fedsim.server.app:app``, ``fedsim.client.app:app``,
named in ``pyproject.toml``) run as real Flower processes talking over HTTP on 127.0.0.1:
``flower-superlink --insecure``, one ``flower-supernode --insecure --node-config
"partition-id=i num-partitions=N"`` per participating client, and ``flwr run`` submitting the
app with the scenario and results folder in its run config. Flower starts one
``flwr-serverapp`` process per run and one ``flwr-clientapp`` process per message.

    python -m fedsim.engine.deploy SCENARIO.toml --out DIR [--set KEY=VALUE]...

Every process is started in its own session and stopped (with its children) on exit, also
after an error or a timeout. Flower's CLI state goes to a private ``FLWR_HOME``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.run import check

CONNECTION = "fedsim-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _executable(name: str) -> str:
    """A Flower console script, preferably the one installed next to this Python."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise ScenarioError(f"{name!r} is not installed; install flwr (pip install 'flwr>=1.41')")
    return found


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, stopped by :meth:`stop`.

    Parameters
    ----------
    num_nodes:
        SuperNodes to start; node ``i`` gets ``partition-id=i num-partitions=num_nodes``.
    workdir:
        Folder for logs and the private ``FLWR_HOME`` (a temporary one if None).
    threads:
        ``OMP_NUM_THREADS`` for every Flower process (1 keeps many small processes from
        fighting over cores).
    """

    def __init__(self, num_nodes: int, workdir: str | Path | None = None,
                 threads: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.num_nodes = num_nodes
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedsim-deploy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home),
                    "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}  # Flower's default: 1 s

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.workdir, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_port(self, port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}; see "
                                   f"{self.workdir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on port {port} within {timeout} s")
            time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        """Write the Flower config, start the SuperLink, then the SuperNodes; wait for all."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\ninsecure = true\n'
        )
        link = self._spawn("superlink", [
            _executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        ])
        self._wait_port(self.port, link, "flower-superlink", timeout)
        for i in range(self.num_nodes):
            node_port = free_port()
            node = self._spawn(f"supernode-{i}", [
                _executable("flower-supernode"), "--insecure", "--superlink", self.address,
                "--host", "127.0.0.1", "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={self.num_nodes}",
            ])
            self._wait_port(node_port, node, f"flower-supernode {i}", timeout)
        return self

    def run(self, app_dir: str | Path, run_config: dict[str, str],
            timeout: float = 600.0) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR <connection> --run-config ... --stream``; waits for the run."""
        pairs = " ".join(f"{k}={_toml_str(v)}" for k, v in run_config.items())
        args = [_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION,
                "--run-config", pairs, "--stream"]
        with open(self.workdir / "flwr-run.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.workdir, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_groups([proc])
                raise TimeoutError(f"flwr run did not finish within {timeout} s; logs in "
                                   f"{self.workdir}") from None
        output = (self.workdir / "flwr-run.log").read_text(errors="replace")
        return subprocess.CompletedProcess(args, code, output)

    def stop(self) -> None:
        """Stop every process this deployment started (SuperNodes first), with its children."""
        _kill_groups(list(reversed(self.procs)))
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def logs(self) -> str:
        """The tail of every process log (for error messages)."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}\n{text[-3000:]}")
        return "\n".join(parts)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir and exc == (None, None, None):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _toml_str(value: str) -> str:
    """A TOML basic string (``flwr run --run-config`` parses values as TOML)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kill_groups(procs: list[subprocess.Popen], grace: float = 3.0) -> None:
    """SIGTERM the process groups ``procs`` lead, SIGKILL what is left after ``grace`` s.

    Each process was started in its own session, so its group holds exactly it and the
    children it spawned (SuperExec, ServerApp/ClientApp processes) and nothing else.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def run_deployed(scenario_path: str | Path, out: str | Path, overrides: Sequence[str] = (),
                 app_dir: str | Path = ".", timeout: float = 600.0,
                 workdir: str | Path | None = None) -> Path:
    """Run a scenario on a local Deployment Engine; returns the results folder.

    Starts one SuperNode per participating client, submits the app with ``flwr run`` and
    stops everything afterwards. Raises RuntimeError (with the processes' logs) if the run
    does not produce ``summary.json``.
    """
    scenario_path = Path(scenario_path).resolve()
    out = Path(out).resolve()
    scenario = check(load_scenario(scenario_path, list(overrides)))  # bad input fails here
    config = {"scenario": str(scenario_path), "out": str(out)}
    if overrides:
        config["set"] = ";".join(overrides)
    with LocalDeployment(scenario.num_participating, workdir) as dep:
        result = dep.run(app_dir, config, timeout=timeout)
        if result.returncode != 0 or not (out / "summary.json").is_file():
            raise RuntimeError(f"the deployed run failed (flwr run exit {result.returncode});"
                               f"\n{dep.logs()}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsim.engine.deploy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--app-dir", default=".", help="the fedsim project (pyproject.toml)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        path = run_deployed(args.scenario, args.out, args.overrides, args.app_dir, args.timeout)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
