"""Every example in README.md does what it says: each ```bash, ```sh and
```python block runs, each ```console block prints what it shows, and each ```toml block is
a valid scenario (README "Testing").

The blocks run in README order, as a reader following it would run them, in one temporary
folder holding copies of ``scenarios/``, ``strategies/`` and ``benchmarks/`` (so a block that
reads ``results/...`` finds what an earlier block wrote, and nothing lands in the
repository). ``fedsim`` and ``python`` there are this checkout's. ``FEDSIM_MAX_ROUNDS=1`` and
``FEDSIM_MAX_CELLS=1`` shorten every run and sweep to seconds (and ``OMP_NUM_THREADS=1`` keeps
torch to one thread, as in the rest of the suite). A block preceded by
``<!-- readme: not runnable (REASON) -->`` is not run; the reason is shown as the skip reason.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from markdown_doc import NOT_RUNNABLE, README, ROOT, Block, blocks, markers  # tests/markdown_doc.py

from fedsim.config import MAX_CELLS_ENV, MAX_ROUNDS_ENV, load_scenario

SHELL = {"bash", "sh", "shell", "console"}
RUNNABLE = SHELL | {"python", "py"}
KNOWN = RUNNABLE | {"toml", "text", ""}
COPIED = ("scenarios", "strategies", "benchmarks")
LIMITS = {MAX_ROUNDS_ENV: "1", MAX_CELLS_ENV: "1"}
TIMEOUT_S = 240

BLOCKS = blocks(README.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.lang in RUNNABLE]
TOML = [b for b in BLOCKS if b.lang == "toml"]


class Reader:
    """A reader working through the README: one folder, blocks run in order, each once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[int, subprocess.CompletedProcess | None] = {}
        for name in COPIED:
            shutil.copytree(ROOT / name, folder / name,
                            ignore=shutil.ignore_patterns("__pycache__", "results"))
        shims = folder / ".bin"  # `fedsim` and `python` are this checkout's, whatever is installed
        shims.mkdir()
        for name, line in (("fedsim", f'exec "{sys.executable}" -m fedsim.cli "$@"'),
                           ("python", f'exec "{sys.executable}" "$@"'),
                           ("python3", f'exec "{sys.executable}" "$@"')):
            shim = shims / name
            shim.write_text(f"#!/bin/sh\n{line}\n")
            shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
        # one torch thread, as in the rest of the suite: on 2 shared cores a second OpenMP
        # thread spins while it waits for a core (tests/conftest.py)
        self.env = {**os.environ, **LIMITS, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
                    "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    def run(self, block: Block) -> subprocess.CompletedProcess | None:
        """Run every runnable block up to and including ``block`` that has not run yet;
        ``block``'s result (None when it is marked not runnable)."""
        for earlier in RUN:
            if earlier.line > block.line:
                break
            if earlier.line not in self.done:
                self.done[earlier.line] = (None if earlier.not_runnable
                                           else self._execute(earlier))
        return self.done[block.line]

    def _execute(self, block: Block) -> subprocess.CompletedProcess:
        if block.lang == "console":
            return self._session(block)
        argv = (["bash", "-e", "-o", "pipefail", "-c", block.text] if block.lang in SHELL
                else [sys.executable, "-c", block.text])
        return self._call(argv)

    def _call(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, cwd=self.folder, env=self.env, capture_output=True,
                                  text=True, timeout=TIMEOUT_S, **kw)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, -1, exc.stdout or "",
                                               f"{exc.stderr or ''}\ntimed out after "
                                               f"{TIMEOUT_S} s")

    def _session(self, block: Block) -> subprocess.CompletedProcess:
        """A ``console`` block: each ``$ `` line runs on its own (its exit code aside), and
        what it prints, stdout and stderr together, must be the lines that follow it (the
        limits' own ``note:`` lines left out)."""
        steps: list[tuple[str, list[str]]] = []
        for line in block.text.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
        for command, expected in steps:
            result = self._call(["bash", "-c", command + " 2>&1"])
            got = [line for line in result.stdout.splitlines()
                   if not line.startswith(tuple(f"note: {k}=" for k in LIMITS))]
            if got != expected or result.returncode < 0:
                return subprocess.CompletedProcess(
                    command, 1, "", f"$ {command}\nexpected:\n" + "\n".join(expected)
                    + "\ngot:\n" + "\n".join(got))
        return subprocess.CompletedProcess(block.text, 0, "", "")

    def failed_before(self, block: Block) -> list[int]:
        return [line for line, result in self.done.items()
                if line < block.line and result is not None and result.returncode != 0]


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Reader:
    return Reader(tmp_path_factory.mktemp("readme"))


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_block_runs(block: Block, reader: Reader):
    if block.not_runnable:
        pytest.skip(f"README line {block.line} is marked not runnable: {block.not_runnable}")
    result = reader.run(block)
    if result.returncode != 0:
        earlier = reader.failed_before(block)
        pytest.fail(
            f"README line {block.line} ({block.section}) exited {result.returncode}"
            + (f" (earlier blocks failed too, at lines {earlier})" if earlier else "")
            + f":\n{textwrap.indent(block.text, '    ')}\nstdout:\n{result.stdout[-3000:]}"
            f"\nstderr:\n{result.stderr[-3000:]}", pytrace=False)


@pytest.mark.parametrize("block", TOML, ids=[b.id for b in TOML])
def test_readme_toml_block_is_a_valid_scenario(block: Block, tmp_path):
    """A TOML block, whole file or fragment, parses as a scenario (every key known, typed
    and in range; a fragment gets the defaults); one introduced as a shipped scenario file
    (its lead line names ``scenarios/....toml`` and ends with ":") agrees with that file on
    every key it sets."""
    if block.not_runnable:
        pytest.skip(f"README line {block.line} is marked: {block.not_runnable}")
    path = tmp_path / "block.toml"
    path.write_text(block.text)
    scenario = load_scenario(path)  # ScenarioError names the key
    named = [w.strip("`:,.") for w in block.lead.split() if w.strip("`:,.").endswith(".toml")]
    if not (block.lead.endswith(":") and named and named[-1].startswith("scenarios/")):
        return
    shipped = load_scenario(ROOT / named[-1])
    values = {**flat(shipped.to_dict()), **flat(tomllib.loads((ROOT / named[-1]).read_text()))}
    differs = {k: (v, values.get(k)) for k, v in flat(tomllib.loads(block.text)).items()
               if k not in ("name", "claims") and values.get(k) != v}
    assert not differs, f"README line {block.line} vs {named[-1]}: (README, file) {differs}"
    missing = [c.name for c in scenario.claims if c not in shipped.claims]
    assert not missing, f"README line {block.line}: claims not in {named[-1]}: {missing}"


def flat(d: dict, prefix: str = "") -> dict:
    """Nested tables as dotted keys (lists compared as lists)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and key != "server.params":
            out.update(flat(v, key))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def test_every_readme_block_has_a_known_language():
    unknown = [(b.line, b.lang) for b in BLOCKS if b.lang not in KNOWN]
    assert not unknown, (f"fenced blocks in a language the README test does not handle "
                         f"(line, language): {unknown}; use one of {sorted(KNOWN)}")


def test_every_readme_marker_is_understood_and_marks_a_block():
    text = README.read_text(encoding="utf-8")
    marked = {b.line: b for b in BLOCKS if b.marker is not None}
    lines = text.splitlines()
    for line, content in markers(text):
        assert NOT_RUNNABLE.match(content), \
            f"README line {line}: write <!-- readme: not runnable (REASON) -->, got {content!r}"
        after = next(n for n in range(line, len(lines)) if lines[n].strip())
        assert after + 1 in marked, f"README line {line}: the marker is not followed by a block"
