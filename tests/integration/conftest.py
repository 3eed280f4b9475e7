"""Fixtures: real php-fpm + nginx (+ the hub they spawn) per test, on free ports,
with runtime files under build/it/<test>; everything is stopped afterwards."""
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import Stack  # noqa: E402

EXT = os.environ.get("UPLOAD_PROGRESS_EXT", str(ROOT / "target/release/libupload_progress.so"))
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BUILD = ROOT / "build" / "it"


@pytest.fixture
def make_stack(request):
    """make_stack(ini={...}, fpm={...}) -> started Stack; all stopped at teardown."""
    started = []
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    if len(name) > 48:  # short run dirs keep socket paths far from the sun_path limit
        name = name[:39] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]

    def factory(ini=None, fpm=None, suffix="", **kw):
        run_dir = BUILD / f"{name}{suffix}"
        if run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        settings = {"upload_progress.min_interval_ms": "20"}
        settings.update(ini or {})
        s = Stack(str(run_dir), EXT, ini=settings, fpm=fpm, scripts_dir=str(SCRIPTS), **kw)
        started.append(s)
        s.start()
        return s

    yield factory
    for s in started:
        try:
            if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
                print(s.log_tail(80))
        finally:
            s.stop()
            hub_pid = read_hub_pid(s)
            if hub_pid and pid_alive(hub_pid):
                os.kill(hub_pid, 9)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def read_hub_pid(stack):
    try:
        pid_file = next(Path(stack.storage_dir).glob("hub-*.pid"))
        return int(pid_file.read_text().strip())
    except (OSError, ValueError, StopIteration):
        return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False
