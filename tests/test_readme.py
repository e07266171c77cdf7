"""The README opens with the two commands a fresh machine needs, and CI runs the same two."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _opening_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block and text.index(block.group(0)) < text.index("\n## "), \
        "the README's first section must open with a bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_set_up_and_tests():
    setup, tests = _opening_commands()
    assert "pip install torch==2.13.0" in setup and '-e ".[test]"' in setup
    assert "fedsim run scenarios/quickstart.toml" in setup
    assert "python -m pytest" in tests
    assert (ROOT / "scenarios/quickstart.toml").is_file()


def test_ci_runs_the_readme_commands():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    setup, tests = _opening_commands()
    assert ci == [setup.replace("pip install", "python -m pip install --quiet"), tests]
