"""Another process holding a folder's lock, for the tests of one writer per folder."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """import sys, time
from fedsim.lock import hold
with hold(sys.argv[1], "a test's holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def start_holder(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s lock (once this returns); kill it when done."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
