"""The prose of the README, ``docs/`` and ``benchmarks/RESULTS.md`` against the code it
describes: the "Every key" table against the scenario dataclasses, the studies table against
the study files, and every repository path, ``fedsim.`` name, link and cited heading."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
from markdown_doc import README, ROOT, anchors, headings, outside_blocks  # tests/markdown_doc.py

from fedsim.config import ClaimConfig, Scenario, load_scenario, parse_value

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DOCS = [README, RESULTS, *sorted((ROOT / "docs").glob("*.md"))]
#: where code and data cite document headings (README "Testing")
CITING = [*sorted((ROOT / "fedsim").rglob("*.py")),
          *sorted((ROOT / "strategies").rglob("*.py")),
          *sorted((ROOT / "benchmarks").glob("*.py")),
          *sorted((ROOT / "scenarios").rglob("*.toml")), *DOCS]
#: the before-stop hook's check: the project speaks of itself, not of how it was built
DIARY = re.compile(r"(first|second|third|fourth|fifth|sixth|closing|evening|afternoon|morning) "
                   r"session|today's table|issue [0-9]+", re.I)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def section(doc: str, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading
                 and line.startswith("#"))
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level),
               len(lines))
    return "\n".join(lines[start + 1:end])


# --------------------------------------------------------------------------- Every key


def config_defaults() -> dict[str, object]:
    """Every scenario key (dotted) with its default, as the dataclasses define it."""
    out: dict[str, object] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory())  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = default

    walk(Scenario, "")
    return out


def every_key_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in section(text(README), "Every key").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def plain_value(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def test_every_key_row_is_a_scenario_field_with_its_default():
    defaults, rows = config_defaults(), every_key_rows()
    free_form = {"sweep.<key>": "sweep.grid", "sweep.zip.<axis>.<setting>": "sweep.zip",
                 "[[claims]]": "claims"}
    wrong = []
    for key, (stated, _) in rows.items():
        field = free_form.get(key, key)
        if field not in defaults:
            wrong.append(f"{key}: no such scenario key")
        elif key == "name":
            assert stated == "file stem"  # load_scenario names a scenario after its file
        elif field in free_form.values():
            continue
        elif defaults[field] is None:  # "not given" (TOML has no null): the row says "unset"
            if not stated.startswith("unset"):
                wrong.append(f"{key}: the default is unset (None), README says {stated!r}")
        elif not (stated.startswith("`") and stated.endswith("`")):
            wrong.append(f"{key}: default {stated!r} is not a `literal`")
        elif plain_value(parse_value(stated.strip("`"))) != plain_value(defaults[field]):
            wrong.append(f"{key}: README says {stated}, fedsim/config.py has "
                         f"{defaults[field]!r}")
    assert not wrong, "README 'Every key' disagrees with fedsim/config.py:\n" + "\n".join(wrong)


def test_every_scenario_field_has_a_row():
    listed = set(every_key_rows()) | {"sweep.grid", "sweep.zip", "claims"}
    missing = sorted(set(config_defaults()) - listed)
    assert not missing, f"scenario keys without a row in README 'Every key': {missing}"


def test_the_claims_row_names_every_claim_field():
    meaning = every_key_rows()["[[claims]]"][1]
    missing = [f.name for f in dataclasses.fields(ClaimConfig) if f"`{f.name}`" not in meaning]
    assert not missing, f"README 'Every key' [[claims]] row does not name {missing}"


# --------------------------------------------------------------------------- studies


def study_rows() -> list[tuple[str, str]]:
    rows = []
    for line in section(text(README), "Studies").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith(".toml`"):
            rows.append((cells[0].strip("`"), cells[2]))
    return rows


def test_every_study_has_a_row():
    files = {p.name for p in (ROOT / "scenarios" / "studies").glob("*.toml")}
    listed = [name for name, _ in study_rows()]
    assert sorted(listed) == sorted(files), "one README 'Studies' row per study file"


@pytest.mark.parametrize("name,design", study_rows(), ids=[n for n, _ in study_rows()])
def test_study_row_states_the_files_cells_and_seeds(name, design):
    grid = load_scenario(ROOT / "scenarios" / "studies" / name).sweep.grid
    cells = 1
    for values in grid.values():
        cells *= len(values)
    stated = re.search(r"= ([\d,]+) cells", design)
    assert stated and int(stated.group(1).replace(",", "")) == cells, \
        f"{name}: README says {design!r}; the grid has {cells} cells"
    seeds = re.search(r"(\d+) seeds", design)
    assert seeds and int(seeds.group(1)) == len(grid.get("seed", [0])), \
        f"{name}: README says {design!r}; the grid has {len(grid.get('seed', [0]))} seeds"


# --------------------------------------------------------------------------- names and links

PATH = re.compile(r"(?<![\w/.~-])((?:scenarios|benchmarks|fedsim|tests|strategies|docs)/"
                  r"[\w./-]*[\w/])")
PLACEHOLDER = re.compile(r"/[A-Z]+(\.\w+)?$")  # scenarios/NAME.toml: any file there
NAME = re.compile(r"`(fedsim(?:\.\w+)+)(?:\.\{([\w, ]+)\})?")


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_repository_path_a_document_names_exists(doc):
    named = {m for m in PATH.findall(text(doc)) if not PLACEHOLDER.search(m)}
    missing = sorted(m for m in named if not (ROOT / m).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_fedsim_name_a_document_gives_exists(doc):
    names = set()
    for dotted, members in NAME.findall(text(doc)):
        names |= ({f"{dotted}.{m.strip()}" for m in members.split(",")} if members
                  else {dotted})
    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"{doc.name} names what fedsim does not have: {missing}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_link_resolves(doc):
    bad = []
    for target in LINK.findall(outside_blocks(text(doc))):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md"
                                 and anchor not in anchors(text(path))):
            bad.append(target)
    assert not bad, f"{doc.name}: links that lead nowhere: {bad}"


QUOTED = r"\"([^\"\n]{2,90})\"|“([^”\n]{2,90})”|'([^'\n]{2,90})'"
CITE = re.compile(r"(README(?:\.md)?|RESULTS\.md|docs/\w+\.md)`?(?:\]\([^)]*\))?\)?,?\s*\(?"
                  rf"((?:(?:{QUOTED}),?\s*)+)")
BARE = re.compile(r"\((README), ([A-Z][\w ]{2,40})\)")  # (README, Engines)


def cited(source: str) -> list[tuple[str, str]]:
    """(document, heading) of every ``DOC, "Heading"`` citation in ``source`` (also with
    single quotes, a Markdown link or code span around DOC, or ``(README, Heading)``),
    comment marks and line breaks removed first."""
    flat = re.sub(r"\s*\n\s*(?:#:?|//|\*)?\s*", " ", source)
    out = []
    for doc, quoted, *_ in CITE.findall(flat):
        # a heading split over two concatenated string literals: 'Write your own " "strategy'
        out += [(doc, re.sub(r'"\s*"', "", "".join(parts)))
                for parts in re.findall(QUOTED, quoted)]
    return out + BARE.findall(flat)


def target(doc: str) -> Path:
    if doc.startswith("README"):
        return README
    return RESULTS if doc == "RESULTS.md" else ROOT / doc


def test_every_cited_heading_exists():
    bad = []
    for path in CITING:
        for doc, heading in cited(text(path)):
            if heading not in headings(text(target(doc))):
                bad.append(f"{path.relative_to(ROOT)}: {doc}, {heading!r}")
    assert not bad, "citations of headings that do not exist:\n" + "\n".join(bad)


def test_citation_reader_finds_the_forms_in_use():
    source = ('x (benchmarks/RESULTS.md, "Engines", "GPU\'s") y\n#: in benchmarks/RESULTS.md,\n'
              '#: "Memory reuse"). see README "Install" and [RESULTS](benchmarks/RESULTS.md)'
              ' ("Studies"), `benchmarks/RESULTS.md` ("Checkpoints"), README, \'Long runs\','
              ' (README, Engines)')
    assert cited(source) == [("RESULTS.md", "Engines"), ("RESULTS.md", "GPU's"),
                             ("RESULTS.md", "Memory reuse"), ("README", "Install"),
                             ("RESULTS.md", "Studies"), ("RESULTS.md", "Checkpoints"),
                             ("README", "Long runs"), ("README", "Engines")]


def test_nothing_narrates_how_it_was_built():
    lines = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in CITING for n, line in enumerate(text(path).splitlines(), 1)
             if DIARY.search(line)]
    assert not lines, "lines that narrate when or in which piece of work something was " \
        "built (git keeps history):\n" + "\n".join(lines)
