"""Shared-host hardening, PHP side (worker/spawner): another local user squatting the
ingest socket name, secrets in argv/phpinfo, the respawn loop, and the hub's pid/log
files. Each test says what was tried as the attacker; the user `nobody` plays the
other local user (the FPM workers and the hub run as root here)."""
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EXT, pid_alive, read_hub_pid
from helpers import Pusher, get_json, http, sign_channel
from test_hub import hub_up
from test_ingest_security import SYS_PYTHON, nobody_prefix

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def default_hub_socket(port):
    """config.rs default_hub_socket: predictable from the uid and the listen address."""
    return "@upload-progress-%d-%016x" % (os.geteuid(), fnv1a(b"127.0.0.1:%d" % port))


def hub_file(stack, hub_socket, ext):
    """config.rs Config::hub_file."""
    host = "".join(c if c.isalnum() and c.isascii() or c in "-." else "_" for c in socket.gethostname())
    return Path(stack.storage_dir) / ("hub-%s-%08x.%s" % (host, fnv1a(hub_socket.encode()) & 0xFFFFFFFF, ext))


def php_cli():
    return shutil.which("php8.2") or shutil.which("php")


def error_log(stack):
    p = Path(stack.run_dir) / "php-error.log"
    return p.read_text(errors="replace") if p.exists() else ""


# Listens on the hub's abstract name as another user, answers every connection with a
# forged status/progress frame at once and after every read, and reports, per connection,
# how many bytes PHP sent it (one JSON line each).
SQUATTER = r"""
import json, socket, struct, sys, threading
name = sys.argv[1]
fake = json.dumps({"running": True, "pid": 1, "version": "6.6.6-evil", "connections": 0,
                   "state": "complete", "path": "/etc/passwd"}).encode()
frame = struct.pack("<I", len(fake)) + fake
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind("\0" + name[1:])
l.listen(64)
print("ready", flush=True)
def serve(c):
    n = 0
    try:
        c.sendall(frame)
        c.settimeout(2)
        while True:
            b = c.recv(65536)
            if not b:
                break
            n += len(b)
            c.sendall(frame)
    except OSError:
        pass
    print(json.dumps({"bytes": n}), flush=True)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def test_a_squatter_of_another_uid_gets_nothing_and_is_reported(make_stack):
    """Attacker: user nobody binds the predictable abstract name of the hub before any
    hub runs, accepts every worker and answers queries with a forged hub_status()
    (version 6.6.6-evil) and progress() (`complete`, path /etc/passwd). Before: the
    workers took it for the hub, sent it Hello and every Publish, publish() returned
    true and progress()/hub_status() returned the forged JSON."""
    prefix = nobody_prefix()
    port = free_port()
    name = default_hub_socket(port)
    squatter = subprocess.Popen(prefix + [SYS_PYTHON, "-c", SQUATTER, name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert squatter.stdout.readline().strip() == "ready", squatter.stderr.read()
        s = make_stack(hub_port=port)
        for _ in range(3):
            status, body = get_json(f"{s.base_url}/t/status.php")
            assert status == 200, body
            hub = body["hub"]
            assert hub["hub_socket"] == name, hub
            assert hub["running"] is False, hub
            assert hub.get("version") != "6.6.6-evil", hub
            assert hub.get("foreign_uid") == 65534, hub
            assert "65534" in hub.get("error", ""), hub
            status, body = get_json(f"{s.base_url}/t/publish.php?channel=sq&event=leak&data=%7B%7D")
            assert status == 200 and body["ok"] is False, body
            status, body = get_json(f"{s.base_url}/t/progress.php?id=abc")
            assert status == 200 and body is None, body
        # No hub of ours was started under a name it cannot have.
        assert read_hub_pid(s) is None
        # Reported once for the host, in the PHP error log (not on any page).
        lines = [l for l in error_log(s).splitlines() if "held by a process of uid 65534" in l]
        assert len(lines) == 1, error_log(s)
        # php --ri says it too.
        ri = subprocess.run([php_cli(), "-c", s.php_ini_path, "--ri", "upload_progress"],
                            capture_output=True, text=True, timeout=30)
        assert "held by a process of uid 65534" in ri.stdout, ri.stdout + ri.stderr
    finally:
        time.sleep(0.3)
        squatter.terminate()
        out, _ = squatter.communicate(timeout=10)
    counts = [json.loads(l)["bytes"] for l in out.splitlines() if l.startswith("{")]
    assert counts, "the workers did connect (and looked at who listens)"
    assert set(counts) == {0}, f"bytes the squatter received per connection: {counts}"


BIND_ONLY = r"""
import socket, sys, time
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind("\0" + sys.argv[1][1:])
print("ready", flush=True)
time.sleep(600)
"""


def test_a_squatter_that_only_binds_the_name_is_reported_not_respawned_against(make_stack):
    """Attacker: user nobody binds the hub's abstract name without listening (connects
    are refused, so its uid cannot be read). Before: every worker took the refusal for
    "no hub", tried to spawn one every second, met EADDRINUSE and took that for "a hub
    is starting"; hub_status() just said "not running". Now the spawner calls it an
    error, backs off, and hub_status() says why."""
    prefix = nobody_prefix()
    port = free_port()
    name = default_hub_socket(port)
    squatter = subprocess.Popen(prefix + [SYS_PYTHON, "-c", BIND_ONLY, name], stdout=subprocess.PIPE, text=True,
                                cwd="/")
    try:
        assert squatter.stdout.readline().strip() == "ready"
        s = make_stack(hub_port=port)
        deadline = time.time() + 5
        hub = {}
        while time.time() < deadline:
            status, body = get_json(f"{s.base_url}/t/status.php")
            hub = body["hub"]
            if hub.get("spawn_error"):
                break
            time.sleep(0.1)
        assert hub["running"] is False, hub
        assert "does not accept connections" in (hub.get("spawn_error") or ""), hub
        assert hub.get("spawn_attempts", 0) >= 1 and hub.get("next_spawn_in_s", -1) >= 0, hub
        assert read_hub_pid(s) is None
    finally:
        squatter.kill()
        squatter.wait()


def start_redis_with_password(run_dir, password):
    exe = shutil.which("redis-server")
    if not exe:
        pytest.skip("redis-server not installed")
    port = free_port()
    os.makedirs(run_dir, exist_ok=True)
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--requirepass", password, "--dir", str(run_dir)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    pytest.skip("redis-server did not start")


def test_secrets_stay_out_of_argv_environ_phpinfo_and_status(make_stack, tmp_path):
    """Attacker: any local user reads /proc/<hub pid>/cmdline (world-readable) and the
    phpinfo()/`php --ri` output. Before: the hub's command line carried
    `-d upload_progress.redis_url=redis://:<password>@…`, and phpinfo printed app_secret
    and the Redis password. Also: a value the workers read whole (app_key `k;ey`) was
    re-parsed as INI for the hub, which cut it at `;` and refused the real key (4001)."""
    password = "Rp-" + os.urandom(6).hex()
    secret = "S3cr;et-" + os.urandom(6).hex()
    redis, rport = start_redis_with_password(tmp_path / "redis", password)
    try:
        url = f"redis://:{password}@127.0.0.1:{rport}"
        s = make_stack(ini={"upload_progress.redis_url": url, "upload_progress.app_secret": secret,
                            "upload_progress.app_key": "k;ey"})
        info = hub_up(s)
        pid = info["pid"]
        for f in ("cmdline", "environ"):
            raw = Path(f"/proc/{pid}/{f}").read_bytes().decode(errors="replace")
            assert password not in raw and secret not in raw, f"{f}: {raw!r}"
            assert "upload_progress.redis_url" not in raw and "app_secret" not in raw, f"{f}: {raw!r}"
        # The hub runs with exactly the workers' settings: the key with `;`, the secret,
        # and the password (it reaches Redis with it).
        c = Pusher(s, key="k;ey")
        status, body = http("POST", f"{s.base_url}/t/auth.php",
                            f"socket_id={c.socket_id}&channel_name=private-upload.sec".encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200, body
        assert json.loads(body)["auth"] == "k;ey:" + sign_channel(secret, c.socket_id, "private-upload.sec")
        assert c.subscribe("private-upload.sec", auth=json.loads(body)["auth"])["event"] \
            == "pusher_internal:subscription_succeeded"
        c.close()
        deadline = time.time() + 10
        while time.time() < deadline and not (hub_up(s).get("redis") or {}).get("connected"):
            time.sleep(0.1)
        assert (hub_up(s).get("redis") or {}).get("connected"), hub_up(s)
        # hub_status(): the URL with its password replaced.
        status, body = get_json(f"{s.base_url}/t/status.php")
        text = json.dumps(body)
        assert password not in text and secret not in text, text
        assert body["hub"]["redis_url"] == f"redis://***@127.0.0.1:{rport}", body
        # phpinfo() (HTML, through FPM) and `php --ri` (text): masked.
        status, page = http("GET", f"{s.base_url}/t/phpinfo.php")
        assert status == 200
        page = page.decode(errors="replace")
        assert "upload_progress.app_secret" in page, page[:2000]
        assert password not in page and secret not in page
        assert "********" in page and f"redis://***@127.0.0.1:{rport}" in page
        ri = subprocess.run([php_cli(), "-c", s.php_ini_path, "--ri", "upload_progress"],
                            capture_output=True, text=True, timeout=30)
        assert ri.returncode == 0, ri.stderr
        assert password not in ri.stdout and secret not in ri.stdout, ri.stdout
        assert re.search(r"upload_progress\.app_secret => \*{8} => \*{8}", ri.stdout), ri.stdout
        assert f"upload_progress.redis_url => redis://***@127.0.0.1:{rport}" in ri.stdout, ri.stdout
        # An unset secret is shown as unset, not as stars.
        ri = subprocess.run([php_cli(), "-n", "-d", f"extension={EXT}", "--ri", "upload_progress"],
                            capture_output=True, text=True, timeout=30)
        assert "upload_progress.app_secret => no value => no value" in ri.stdout, ri.stdout
        # Nothing secret in the logs either.
        logs = error_log(s) + "".join(p.read_text(errors="replace") for p in Path(s.storage_dir).glob("hub-*.log"))
        assert password not in logs and secret not in logs, logs
    finally:
        redis.terminate()
        redis.wait(timeout=10)


HOLD_PORT = r"""
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_taken_port_backs_off_per_host_instead_of_respawning_every_second(make_stack):
    """Attacker (or accident): another process holds the hub's TCP port. Before: every
    worker respawned a hub every second, forever, each failing with "address in use",
    and hub_status() only said "not running". Now: one spawn for the whole host after
    1 s, 2 s, 4 s … (capped at 5 min), the reason logged once, reported in hub_status()
    and `php --ri`, and the backoff starts over once a hub ran."""
    port = free_port()
    holder = subprocess.Popen([SYS_PYTHON, "-c", HOLD_PORT, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        s = make_stack(hub_port=port)
        t0 = time.time()
        while time.time() - t0 < 8:
            status, body = get_json(f"{s.base_url}/t/status.php")
            assert status == 200 and body["hub"]["running"] is False, body
            time.sleep(0.1)
        logs = "".join(p.read_text(errors="replace") for p in Path(s.storage_dir).glob("hub-*.log"))
        spawns = logs.count("Hub::run(): cannot listen on")  # one uncaught exception per hub
        # 4 workers × 8 s used to give 8 or more; the host's backoff allows t=0, 1, 3, 7.
        assert 1 <= spawns <= 5, f"{spawns} spawns in 8 s:\n{logs[-3000:]}"
        hub = body["hub"]
        assert "in use" in (hub.get("spawn_error") or "").lower(), hub
        assert isinstance(hub.get("next_spawn_in_s"), int) and hub["next_spawn_in_s"] >= 0, hub
        assert hub.get("spawn_attempts", 0) >= 3, hub
        reasons = [l for l in error_log(s).splitlines() if "the hub exited" in l]
        assert len(reasons) == 1, error_log(s)
        assert "in use" in reasons[0].lower()
        state = hub_file(s, hub["hub_socket"], "spawn")
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
        ri = subprocess.run([php_cli(), "-c", s.php_ini_path, "--ri", "upload_progress"],
                            capture_output=True, text=True, timeout=30)
        assert "the last hub exited" in ri.stdout and "next start in" in ri.stdout, ri.stdout
    finally:
        holder.kill()
        holder.wait()
    # The port is free again: the next spawn (within the current backoff) works, and a
    # hub that ran resets the backoff for the whole host.
    info = hub_up(s, timeout=30)
    assert info["running"]
    time.sleep(6)
    st = json.loads(hub_file(s, info["hub_socket"], "spawn").read_text())
    assert st["failures"] == 0 and st["next_at_ms"] == 0, st


def test_pid_and_log_files_are_private_and_never_follow_planted_links(make_stack, tmp_path):
    """Attacker: a user who can write to the storage root plants hub-<host>-<hash>.log and
    .pid as symlinks to a file of the victim, or as files of their own. Before: the
    spawned hub appended its log to the symlink's target, overwrote the pid file's target
    with its pid, wrote into a file owned by the attacker, and created the pid file 0644
    (umask) when app_secret was set."""
    s = make_stack(ini={"upload_progress.app_secret": "x" * 40})
    os.umask(0o022)
    name = default_hub_socket(s.hub_port)
    log, pid = hub_file(s, name, "log"), hub_file(s, name, "pid")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, log)
    os.symlink(victim, pid)
    info = hub_up(s)
    time.sleep(0.5)
    assert victim.read_text() == "precious\n", "a planted symlink was followed"
    assert log.is_symlink() and pid.is_symlink()
    assert "hub log refused" in error_log(s) and "symbolic link" in error_log(s), error_log(s)
    # Stop that hub; remove the links; a file of another user is refused too.
    os.kill(info["pid"], 15)
    deadline = time.time() + 10
    while pid_alive(info["pid"]) and time.time() < deadline:
        time.sleep(0.05)
    log.unlink()
    pid.unlink()
    pid.write_text("999999999")  # no such process, whatever teardown does with it
    os.chown(pid, 65534, 65534)
    info = hub_up(s, timeout=20)
    assert pid.read_text() == "999999999", "wrote into another user's pid file"
    # Without planted files: both are created 0600, owned by us, whatever the umask.
    os.kill(info["pid"], 15)
    while pid_alive(info["pid"]) and time.time() < deadline + 10:
        time.sleep(0.05)
    pid.unlink()
    info = hub_up(s, timeout=20)
    deadline = time.time() + 5
    while not pid.exists() and time.time() < deadline:
        time.sleep(0.05)
    for p in (log, pid):
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid(), p
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{p.name} is {oct(stat.S_IMODE(st.st_mode))}"
    assert pid.read_text().strip() == str(info["pid"])
