"""The process watch a Ray run keeps: processes started below this one are noted (on
demand, or by the background poll) and stopped at the end, even once orphaned."""

import subprocess
import sys
import time

from fedsim.engine.processes import TreeWatch, alive, find_proc

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_noted_child_is_stopped_after_it_was_orphaned():
    """A grandchild whose parent has exited is no longer below this process; noted while it
    was, :meth:`TreeWatch.stop` still ends it (Ray's workers after ``ray.shutdown``)."""
    with TreeWatch(interval=3600.0) as watch:  # no background look during the test
        parent = subprocess.Popen([sys.executable, "-c",
                                   "import subprocess, sys, time; "
                                   f"p = subprocess.Popen({SLEEPER!r}); print(p.pid, flush=True); "
                                   "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        grandchild = find_proc(int(parent.stdout.readline()))
        assert grandchild is not None
        watch.note()
        assert grandchild in watch.seen
        parent.kill()
        parent.wait()
        assert alive(grandchild)  # orphaned, still running
    left = watch.stop(grace=5.0)
    assert left == [] and not alive(grandchild)


def test_a_process_that_existed_before_the_watch_is_left_alone():
    before = subprocess.Popen(SLEEPER)
    try:
        with TreeWatch(interval=3600.0) as watch:
            watch.note()
        watch.stop(grace=1.0)
        time.sleep(0.1)
        assert before.poll() is None  # still running
    finally:
        before.kill()
        before.wait()
