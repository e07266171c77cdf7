"""The import graph of ``fedsim`` and ``strategies``: no cycles, imports that point down the
layers of DESIGN.md, few imports hidden in functions, and a scenario parsed without torch,
Flower or any registry.

The graph is read from the source (module-level and function-level ``import`` statements,
as /work/shared/tools/import_graph.py reads it), so a cycle through a function-level import
counts: hiding an import inside a function does not remove the dependency.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.run import check

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsim", "strategies")
#: imports of project modules inside functions, each with a reason at the import (a heavy
#: optional dependency, or the light CLI / ``import fedsim``); raise only with a reason
MAX_FUNCTION_LEVEL = 10


#: DESIGN.md's layers, top to bottom (module-name prefixes; the longest match wins). A module
#: imports its own layer and the layers below it.
LAYERS = (
    ("edge", ("fedsim.cli", "fedsim.sweep", "fedsim.report", "fedsim.cells")),
    ("run", ("fedsim.run", "fedsim.runner", "fedsim.validate")),
    ("server", ("fedsim.server", "fedsim.checkpoint", "fedsim.plugins", "strategies")),
    ("privacy · sinks", ("fedsim.privacy", "fedsim.sinks")),
    ("engine", ("fedsim.engine", "fedsim.state_journal")),
    ("client", ("fedsim.client",)),
    ("models · data", ("fedsim.models", "fedsim.data", "fedsim.context", "fedsim.device")),
    ("leaves", ("fedsim.config", "fedsim.registry", "fedsim.rng", "fedsim.arrays",
                "fedsim.errors", "fedsim.compat", "fedsim.files", "fedsim.records",
                "fedsim.interrupt", "fedsim.lock", "fedsim.text", "fedsim.canaries",
                "fedsim.stats", "fedsim")),
)

#: the upward imports the code still has, each with its reason; any other upward import
#: fails the test, and one that is gone must leave this table
KNOWN_UPWARD = {
    ("fedsim", "fedsim.run"): "`import fedsim` exports run(); fedsim.run stays light and "
                              "loads the rest on first use",
    ("fedsim.client.app", "fedsim.plugins"): "the ClientApp's entry in its own process "
                                             "(Ray, flwr run .) fills the registries",
    ("fedsim.server.app", "fedsim.validate"): "the ServerApp of flwr run . is the composition "
                                              "root of its own process: it checks names there",
    ("fedsim.client.dpsgd", "fedsim.privacy.accountant"): "DP-SGD calibrates σ with the "
                                                          "privacy accountant",
    ("fedsim.client.messages", "fedsim.server.strategies"): "the client asks the strategy "
                                                            "class for its hooks",
    ("fedsim.engine.deploy", "fedsim.run"): "python -m fedsim.engine.deploy is a command-line "
                                            "edge: it checks the scenario",
    ("fedsim.engine.deploy", "fedsim.sinks.progress"): "... and shows the progress line of "
                                                       "the deployed run",
    ("fedsim.interrupt", "fedsim.checkpoint"): "the interrupted: line names the last "
                                               "checkpointed round",
}


def layer_of(module: str) -> int | None:
    """Index of ``module``'s layer in LAYERS (0 = top), or None if no prefix matches. The
    package ``fedsim`` itself is a leaf; a module of it needs its own entry."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module.startswith(p + ".") and p != "fedsim"
            if (module == p or inside) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return best[1] if best else None


def upward_imports(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs whose target sits in a higher layer than the importer."""
    return {(a, b) for a, targets in edges.items() for b in targets
            if layer_of(b) is not None and layer_of(a) is not None and layer_of(b) < layer_of(a)}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> project modules it imports, and ``file:line -> target`` of every
    function-level import of a project module (of the tree under ``root``)."""
    mods = project_modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    local: list[str] = []
    for mod, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        in_function = {id(sub) for node in ast.walk(tree)
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for sub in ast.walk(node) if sub is not node}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            else:
                continue
            hits = {resolve(t) for t in targets} - {None, mod}
            # "from pkg import sub" names the package too: keep the most specific hits
            hits = {h for h in hits if not any(o != h and o.startswith(h + ".") for o in hits)}
            if hits and id(node) in in_function:
                local.append(f"{f.relative_to(root)}:{node.lineno} -> {', '.join(sorted(hits))}")
            edges[mod] |= hits
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_fedsim_and_strategies():
    edges, _ = import_graph()
    assert "fedsim.config" in edges and "strategies" in edges  # the walk found the packages
    assert cycles(edges) == []


def test_every_module_has_a_layer():
    edges, _ = import_graph()
    assert [m for m in edges if layer_of(m) is None] == []
    assert layer_of("fedsim.unheard_of") is None  # a module added later must be placed


def test_imports_point_down_the_layers():
    upward = upward_imports(import_graph()[0])
    new = sorted(upward - set(KNOWN_UPWARD))
    assert new == [], "upward imports (import from your own layer or below): " + ", ".join(
        f"{a} -> {b}" for a, b in new)
    gone = sorted(set(KNOWN_UPWARD) - upward)
    assert gone == [], f"no longer imported upward, remove from KNOWN_UPWARD: {gone}"


def test_an_upward_import_planted_in_a_copy_fails_the_layer_check(tmp_path):
    """The check reads the source: a sink importing the server (above it) is caught."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    folder = tmp_path / "fedsim" / "sinks" / "folder.py"
    folder.write_text(folder.read_text() + "\nfrom fedsim.server.app import server_main\n")
    upward = upward_imports(import_graph(tmp_path)[0])
    assert upward - set(KNOWN_UPWARD) == {("fedsim.sinks.folder", "fedsim.server.app")}
    assert layer_of("fedsim.sinks.folder") > layer_of("fedsim.server.app")


def test_few_project_imports_inside_functions():
    _, local = import_graph()
    assert len(local) <= MAX_FUNCTION_LEVEL, "\n".join(local)


def test_registries_do_not_import_plugins():
    edges, _ = import_graph()
    assert "strategies" not in edges["fedsim.server.strategies"]
    assert "fedsim.client.compress" not in edges["fedsim.client.hooks"]
    assert {"fedsim.client.compress", "fedsim.client.failures", "strategies"} <= edges[
        "fedsim.plugins"]


def test_parsing_a_scenario_imports_no_torch_flower_or_registry():
    code = ("import sys, fedsim.config\n"
            "fedsim.config.load_scenario('scenarios/quickstart.toml')\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert [m for m in out if m.split(".")[0] in ("torch", "flwr", "strategies")] == []
    # config, the leaves it may use, and fedsim.run (``import fedsim`` exports run) with the
    # light leaves it holds a results folder with (its lock, atomic files, one-line text)
    allowed = {"fedsim.config", "fedsim.errors", "fedsim.registry", "fedsim.run",
               "fedsim.lock", "fedsim.files", "fedsim.text"}
    assert "fedsim.config" in out and {m for m in out if m.startswith("fedsim.")} <= allowed


@pytest.mark.parametrize(("override", "pattern"), [
    ("model.norm=batch", r"unknown norm in model.norm = 'batch'"),
    ("server.strategy=fedbnn", r"unknown strategy.*did you mean 'fedbn'"),
    ("data.name=imagenet", r"unknown dataset in data.name"),
])
def test_names_are_checked_at_the_edge_not_when_parsing(override, pattern):
    scenario = load_scenario("scenarios/quickstart.toml", [override])  # parses
    with pytest.raises(ScenarioError, match=pattern):
        check(scenario)


#: what ``fedsim.privacy`` may import besides itself: models and data, and the leaves below
#: them (DESIGN.md). Shadow federations, the attacked client's training and the strategy
#: reach the audits as callables from the server layer (fedsim/server/audits.py).
PRIVACY_MAY_IMPORT = ("fedsim.models", "fedsim.data", "fedsim.device", "fedsim.config",
                      "fedsim.registry", "fedsim.rng", "fedsim.arrays", "fedsim.errors",
                      "fedsim.compat", "fedsim.files", "fedsim.records", "fedsim.canaries",
                      "fedsim.stats")


def privacy_imports_above(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(privacy module, project module above models / data / leaves) pairs it imports."""
    def allowed(target: str) -> bool:
        return any(target == p or target.startswith(p + ".")
                   for p in ("fedsim.privacy", *PRIVACY_MAY_IMPORT))

    return {(a, b) for a, targets in edges.items()
            if a == "fedsim.privacy" or a.startswith("fedsim.privacy.")
            for b in targets if not allowed(b)}


def test_privacy_imports_nothing_above_models_data_and_leaves():
    edges, _ = import_graph()
    assert "fedsim.privacy.audits.membership" in edges  # the walk found the audits
    assert privacy_imports_above(edges) == set()


def test_the_privacy_layer_check_catches_an_import_of_the_server_or_client():
    edges = {"fedsim.privacy.audits.x": {"fedsim.server.loop", "fedsim.models.norm"},
             "fedsim.privacy": {"fedsim.client.train", "fedsim.privacy.mia"},
             "fedsim.server.audits": {"fedsim.client.train"}}
    assert privacy_imports_above(edges) == {("fedsim.privacy.audits.x", "fedsim.server.loop"),
                                            ("fedsim.privacy", "fedsim.client.train")}
