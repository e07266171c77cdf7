"""Flower's Deployment Engine on this machine: a SuperLink, N SuperNodes and ``flwr run``.

The same ServerApp and ClientApp (``fedsim.server.app:app``, ``fedsim.client.app:app``,
named in ``pyproject.toml``) run as real Flower processes talking over HTTP on 127.0.0.1:
``flower-superlink --insecure``, one ``flower-supernode --insecure --node-config
"partition-id=i num-partitions=N"`` per participating client, and ``flwr run`` submitting the
app with the scenario and results folder in its run config. Flower starts one
``flwr-serverapp`` process per run and one ``flwr-clientapp`` process per message. The
SuperNodes' node ids, read from their logs, go to the ServerApp in a file named in the run
config (:meth:`LocalDeployment.node_partitions`), so it sends no query message (and Flower
starts no ``flwr-clientapp``) per node to learn which node is which client.

    python -m fedsim.engine.deploy SCENARIO.toml --out DIR [--set KEY=VALUE]...

The SuperLink and the SuperNodes are watched while the run goes: one that exits ends the run
within :data:`POLL` s with one :class:`~fedsim.errors.EngineFailed` line (exit 4) naming it
and the checkpoint the results folder keeps. Every process is started in its own session; on
exit, also after an error, a timeout, Ctrl-C or SIGTERM, it is stopped together with
everything below it, the processes Flower starts in
sessions of their own included (:mod:`fedsim.engine.processes`). While the run goes, the
command shows the same progress line as ``fedsim run`` (read from the results folder's
``rounds.jsonl``); an interrupted run ends with one line naming its last checkpointed round
and ``fedsim run --resume DIR``, which finishes it in-process (exit 130 / 143). Flower's CLI
state goes to a private ``FLWR_HOME``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedsim.config import load_scenario
from fedsim.engine.known_nodes import NODE_PARTITIONS_KEY, write_node_partitions
from fedsim.engine.processes import Proc, find_proc, stop_tree
from fedsim.errors import EngineFailed, OneLineArgumentParser, RunStopped, ScenarioError
from fedsim.files import write_text
from fedsim.interrupt import Interrupted, exit_code, failed_line, run_line, signals_interrupt
from fedsim.lock import hold
from fedsim.run import check, preflight
from fedsim.sinks.progress import RoundsFollower, round_progress
from fedsim.text import one_line

CONNECTION = "fedsim-local"
#: seconds between looks at the run's progress and at the Flower processes' health
POLL = 0.5
#: the line a SuperNode logs once registered (flwr/supernode/start_client_internal.py)
NODE_ID_LINE = re.compile(rb"SuperNode ID: (\d+)")


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
        self.names: dict[int, str] = {}  # pid -> what it is ("flower-supernode 3")
        self._started: list[Proc] = []  # the same processes, named by pid and start time
        self._logs: list = []
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home),
                    "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}  # Flower's default: 1 s

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], what: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=self.workdir, start_new_session=True)
        self.procs.append(child)
        self.names[child.pid] = what
        if (named := find_proc(child.pid)) is not None:
            self._started.append(named)
        return child

    def _wait_port(self, port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if proc.poll() is not None:
                raise EngineFailed(f"{what} exited with code {proc.returncode} while starting; "
                                   f"its log is in {self.workdir}")
            if time.monotonic() > deadline:
                raise EngineFailed(f"{what} did not listen on port {port} within {timeout:g} s; "
                                   f"its log is in {self.workdir}")
            time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        """Write the Flower config, start the SuperLink, then the SuperNodes; wait for all."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        write_text(self.flwr_home / "config.toml",
                   f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                   f'address = "{self.address}"\ninsecure = true\n')
        link = self._spawn("superlink", [
            _executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        ], "flower-superlink")
        self._wait_port(self.port, link, "flower-superlink", timeout)
        for i in range(self.num_nodes):
            node_port = free_port()
            node = self._spawn(f"supernode-{i}", [
                _executable("flower-supernode"), "--insecure", "--superlink", self.address,
                "--host", "127.0.0.1", "--port", str(node_port),
                "--node-config", f"partition-id={i} num-partitions={self.num_nodes}",
            ], f"flower-supernode {i}")
            self._wait_port(node_port, node, f"flower-supernode {i}", timeout)
        return self

    def node_partitions(self, timeout: float = 30.0) -> dict[int, int] | None:
        """Node id → partition id of the SuperNodes, read from the line each logs once the
        SuperLink has registered it ("SuperNode ID: N"); None (the ServerApp then asks each
        node) if a log lacks it within ``timeout`` s.

        Flower gives the ServerApp no other way: the SuperLink draws a random node id when a
        SuperNode registers over the Fleet API, stores no name or ``node-config`` with it
        (``NodeInfo.name`` is set only for nodes pre-registered through the Control API with
        SuperNode authentication), and ``partition-id`` stays on the SuperNode.
        """
        deadline = time.monotonic() + timeout
        found: dict[int, int] = {}
        while len(found) < self.num_nodes:
            for i in range(self.num_nodes):
                if i not in found.values():
                    log = (self.workdir / f"supernode-{i}.log").read_bytes()
                    if (m := NODE_ID_LINE.search(log)) is not None:
                        found[int(m.group(1))] = i
            if len(found) < self.num_nodes:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.1)
        return found

    def run(self, app_dir: str | Path, run_config: dict[str, str], timeout: float = 600.0,
            on_round: Callable[[dict], None] | None = None) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR <connection> --run-config ... --stream``; waits for the run.

        ``on_round`` hears every record the run appends to ``rounds.jsonl`` in its results
        folder (run config ``out``), as it appears. The SuperLink and the SuperNodes are
        watched while the run goes: one that exits ends the run within :data:`POLL` s with an
        :class:`~fedsim.errors.EngineFailed` naming it (the ServerApp would otherwise wait an
        hour for the replies of a node that is gone).
        """
        pairs = " ".join(f"{k}={_toml_str(v)}" for k, v in run_config.items())
        args = [_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION,
                "--run-config", pairs, "--stream"]
        follower = RoundsFollower(Path(run_config.get("out", ".")) / "rounds.jsonl")
        child = self._spawn("flwr-run", args, "flwr run")  # stopped with the rest by stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                code = child.wait(timeout=POLL)
            except subprocess.TimeoutExpired:
                code = None
            for record in follower.poll() if on_round is not None else ():
                on_round(record)
            self._check_alive(but=child)
            if code is not None:
                break
            if time.monotonic() > deadline:
                raise EngineFailed(f"flwr run did not finish within {timeout:g} s (--timeout); "
                                   f"logs in {self.workdir}")
        output = (self.workdir / "flwr-run.log").read_text(errors="replace")
        return subprocess.CompletedProcess(args, code, output)

    def _check_alive(self, but: subprocess.Popen) -> None:
        """Raise EngineFailed naming the first SuperLink or SuperNode that has exited."""
        for proc in self.procs:
            if proc is not but and proc.poll() is not None:
                raise EngineFailed(
                    f"{self.names.get(proc.pid, 'a Flower process')} (pid {proc.pid}) exited "
                    f"with code {proc.returncode} during the run; logs in {self.workdir}")

    def stop(self, grace: float = 3.0) -> None:
        """Stop every process this deployment started, everything below them and every
        process of the sessions they lead: SIGTERM, then SIGKILL after ``grace`` s."""
        stop_tree(self._started, grace)
        for child in self.procs:  # reap them (they are gone: this returns at once)
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                child.kill()
        self.procs.clear()
        self.names.clear()
        self._started.clear()
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
        try:
            return self.start()
        except BaseException:  # a failed or interrupted start leaves nothing running
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir and exc == (None, None, None):
            shutil.rmtree(self.workdir, ignore_errors=True)


def _toml_str(value: str) -> str:
    """A TOML basic string (``flwr run --run-config`` parses values as TOML)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_deployed(scenario_path: str | Path, out: str | Path, overrides: Sequence[str] = (),
                 app_dir: str | Path = ".", timeout: float = 600.0,
                 workdir: str | Path | None = None,
                 on_round: Callable[[dict], None] | None = None) -> Path:
    """Run a scenario on a local Deployment Engine; returns the results folder.

    Starts one SuperNode per participating client, submits the app with ``flwr run`` and
    stops everything afterwards (also on an error or an interrupt). ``on_round`` hears each
    round's record. Bad input (the scenario, its device) is a ScenarioError before any
    process starts; a Flower process that exits, or a run that ends without ``summary.json``,
    raises :class:`~fedsim.errors.EngineFailed` naming the folder of the processes' logs.
    """
    scenario_path = Path(scenario_path).resolve()
    out = Path(out).resolve()
    scenario = check(load_scenario(scenario_path, list(overrides)))  # bad input fails here
    preflight(scenario)  # ... and what this machine cannot run (e.g. an absent GPU)
    if out.is_dir():  # another writer there: one line now (the ServerApp holds the folder's
        with hold(out, "python -m fedsim.engine.deploy", create=False):  # lock as it runs)
            pass
    config = {"scenario": str(scenario_path), "out": str(out)}
    if overrides:
        config["set"] = ";".join(overrides)
    with LocalDeployment(scenario.num_participating, workdir) as dep:
        if (partitions := dep.node_partitions()) is not None:  # no query message per node
            config[NODE_PARTITIONS_KEY] = str(write_node_partitions(
                dep.workdir / "node-partitions.json", partitions))
        result = dep.run(app_dir, config, timeout=timeout, on_round=on_round)
        if result.returncode != 0 or not (out / "summary.json").is_file():
            raise EngineFailed(f"the deployed run failed (flwr run exit {result.returncode}, "
                               f"no summary.json); logs in {dep.workdir}", str(out))
    _raise_if_stopped(out / "summary.json")
    return out


def _raise_if_stopped(summary_path: Path) -> None:
    """A run the ServerApp stopped early (too few replies, divergence: ``summary.json``
    ``stopped``) fails here as it does in-process (RunStopped), not as a finished run;
    ``flwr run`` exits 0 either way. A planned end (``stopped.planned``: early stopping, the
    DP budget, which also sets ``dp.stopped``) is a finished run."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return
    stopped = summary.get("stopped") if isinstance(summary, dict) else None
    planned = isinstance(stopped, dict) and (
        stopped.get("planned") or (summary.get("dp") or {}).get("stopped"))
    if isinstance(stopped, dict) and not planned:
        raise RunStopped(str(stopped.get("reason") or "the run stopped early"),
                         stopped.get("round"))


class _Rounds:
    """Notes that a round was recorded, then passes the record on (an interrupted run says
    whether it has anything to resume)."""

    def __init__(self, then: Callable[[dict], None] | None) -> None:
        self.any = False
        self.then = then

    def __call__(self, record: dict) -> None:
        self.any = True
        if self.then is not None:
            self.then(record)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineArgumentParser(prog="python -m fedsim.engine.deploy",
                                   description="Run a scenario on Flower's Deployment "
                                   "Engine on this machine: a SuperLink, one SuperNode per "
                                   "participating client, and flwr run; every process is "
                                   "stopped at the end, on error, Ctrl-C or SIGTERM.")
    parser.add_argument("scenario", help="scenario TOML file")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    parser.add_argument("--app-dir", default=".", help="the fedsim project (pyproject.toml)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds before the run is stopped (default 3600)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    with signals_interrupt():  # Ctrl-C / SIGTERM: everything stopped, one line, 130 / 143
        rounds = _Rounds(None)
        try:
            scenario = load_scenario(args.scenario, args.overrides)
            run = lambda: run_deployed(args.scenario, args.out, args.overrides,  # noqa: E731
                                       args.app_dir, args.timeout, on_round=rounds)
            if args.quiet:
                path = run()
            else:
                with round_progress(scenario, args.out) as on_round:
                    rounds.then = on_round
                    path = run()
        except ScenarioError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        except EngineFailed as exc:  # one line; the checkpoints in --out stay
            return failed_line(exc, args.out)
        except Interrupted as exc:
            restart = ["python", "-m", "fedsim.engine.deploy", *argv]
            try:
                scenario = load_scenario(args.scenario, args.overrides)
            except ScenarioError:
                return exit_code(exc, "interrupted before the run started")
            return exit_code(exc, run_line(args.out, scenario.server.rounds, rounds.any,
                                           scenario.output.checkpoint_every, restart,
                                           overwrite=None))  # a deployed run always does
    print(f"results → {one_line(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
