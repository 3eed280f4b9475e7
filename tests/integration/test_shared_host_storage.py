"""Storage on a shared host (issue "shared-host hardening", storage items 1, 7, 9, 12, 14).

Other local users are untrusted (the second user here is `nobody`), and so are HTTP
clients. Each test says what was tried as the attacker and what the old code did.
"""
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXT
import urllib.error
import urllib.request

from helpers import OWNER_COOKIE, http

PHP = shutil.which("php8.2") or shutil.which("php")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")


def php(code, ini=None, as_nobody=False, timeout=30):
    """Runs `code` in a PHP CLI with only this extension; returns (rc, stdout+stderr)."""
    argv = [PHP, "-n", "-d", f"extension={EXT}", "-d", "upload_progress.hub=off",
            "-d", "display_errors=stderr"]
    for k, v in (ini or {}).items():
        argv += ["-d", f"{k}={v}"]
    argv += ["-r", code]
    if as_nobody:
        argv = NOBODY + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


ATTEMPTS = r"""
function attempt(string $what, callable $f) {
    try { $r = $f(); echo "$what: ok ", is_string($r) ? $r : json_encode($r), "\n"; }
    catch (Throwable $e) { echo "$what: ", get_class($e), ': ', $e->getMessage(), "\n"; }
}
"""


@pytest.fixture
def shared_tmp():
    """A directory like /tmp: world-writable and sticky, so `nobody` can plant things."""
    d = Path(tempfile.mkdtemp(prefix="upst-shared-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_default_root_is_per_user_and_a_planted_one_is_refused(shared_tmp):
    """Attacker (`nobody`) creates the default storage roots first in the shared tmp dir,
    both the old name `upload-progress` and the new `upload-progress-0`, each with an
    `.app-secret` of their choosing and mode 0777. Old code used `upload-progress` as it was
    and signed channel auth with the attacker's secret.
    Now: the root's default is per euid, and a root owned by someone else is refused by
    every Upload call, by auth() (no signature), by Hub::run() and in `php --ri`."""
    attacker_secret = "attacker-secret"
    for name in ("upload-progress", "upload-progress-0"):
        subprocess.run(NOBODY + ["sh", "-c",
                                 f"mkdir -m 0777 {shared_tmp}/{name} && "
                                 f"printf {attacker_secret} > {shared_tmp}/{name}/.app-secret && "
                                 f"chmod 0666 {shared_tmp}/{name}/.app-secret"], check=True)
    ini = {"sys_temp_dir": str(shared_tmp)}
    rc, out = php(ATTEMPTS + r"""
attempt('create', fn() => UploadProgress\Upload::create(10)->id);
attempt('open', fn() => UploadProgress\Upload::open(str_repeat('a', 26)));
attempt('auth', fn() => UploadProgress\auth('1234.5678', 'private-upload.x'));
attempt('Hub::run', fn() => UploadProgress\Hub::run());
""", ini=ini)
    root = f"{shared_tmp}/upload-progress-0"
    print(out)
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    for what in ("create", "open"):
        assert lines[what].startswith("UploadProgress\\StorageException: storage directory " + root), out
        assert "owned by uid 65534, not by this process's euid 0" in lines[what], out
    # No signature at all, and certainly none made with the attacker's secret.
    forged = hmac.new(attacker_secret.encode(), b"1234.5678:private-upload.x", hashlib.sha256).hexdigest()
    assert forged not in out
    assert lines["auth"].startswith("InvalidArgumentException: auth(): no app secret: storage directory " + root), out
    assert lines["Hub::run"].startswith("UploadProgress\\Exception: Hub::run(): storage directory " + root), out
    # `php --ri` shows the problem.
    r = subprocess.run([PHP, "-n", "-d", f"extension={EXT}", "-d", f"sys_temp_dir={shared_tmp}",
                        "--ri", "upload_progress"], capture_output=True, text=True, timeout=30)
    row = [line for line in r.stdout.splitlines() if line.startswith("storage root")]
    assert row and "refused" in row[0] and root in row[0] and "owned by uid 65534" in row[0], r.stdout
    # Nothing of ours went into the attacker's directories, nothing was chmod'ed.
    for name in ("upload-progress", "upload-progress-0"):
        d = shared_tmp / name
        assert sorted(p.name for p in d.iterdir()) == [".app-secret"]
        assert (d.stat().st_mode & 0o777) == 0o777 and d.stat().st_uid == 65534


def test_php_as_another_user_refuses_a_root_it_does_not_own(shared_tmp):
    """PHP runs as `nobody` with storage_dir pointing at a directory owned by root (created
    by someone else, readable by all). Old code used it (and failed later, or worse, used a
    directory whose contents another user controls). Now every call says who owns it; a
    root of its own, created by the extension, works and is 0700 with 0600 files."""
    foreign = shared_tmp / "foreign"
    foreign.mkdir(mode=0o755)
    os.chmod(foreign, 0o755)
    rc, out = php(ATTEMPTS + "attempt('create', fn() => UploadProgress\\Upload::create(10)->id);",
                  ini={"upload_progress.storage_dir": str(foreign)}, as_nobody=True)
    assert f"storage directory {foreign} is owned by uid 0, not by this process's euid 65534" in out, out

    own = shared_tmp / "own"  # missing: created by the extension as nobody
    rc, out = php(ATTEMPTS + r"""
attempt('create', function () {
    $u = UploadProgress\Upload::create(10);
    $t = tempnam(sys_get_temp_dir(), 'c'); file_put_contents($t, str_repeat('z', 10));
    $u->writeChunk(0, $t); unlink($t);
    return $u->complete();
});
""", ini={"upload_progress.storage_dir": str(own), "upload_progress.app_secret": "s",
          "sys_temp_dir": str(shared_tmp)}, as_nobody=True)
    assert "create: ok" in out, out
    st = own.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (65534, 0o700)
    for p in own.rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert (p.stat().st_mode & 0o7777) == want and p.stat().st_uid == 65534, p


def worker_pids(stack):
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == stack.fpm_master_pid:
                pids.append(int(d.name))
    return pids


def create(stack, size, chunk):
    status, body = http("GET", f"{stack.base_url}/t/storage_chunk.php?op=create&size={size}&chunk={chunk}")
    assert status == 200, body
    return json.loads(body)["id"]


def put(stack, upload_id, index, body, headers=None, timeout=30, bail=False):
    url = f"{stack.base_url}/t/storage_chunk.php?op=put&id={upload_id}&index={index}" + ("&bail=1" if bail else "")
    return http("POST" if bail else "PUT", url, body=body, headers=headers or {}, timeout=timeout)


def test_symlinked_data_part_is_refused_and_the_victim_unchanged(make_stack):
    """Attacker: plants `data.part` inside an upload's directory as a symlink to a file of
    the pool's user (here via the demo API: create an upload, then swap the link in). Old
    code opened it by path and the chunk overwrote the victim file."""
    s = make_stack()
    victim = Path(s.run_dir) / "victim.txt"
    victim.write_bytes(b"precious data of the pool's user\n")
    os.chmod(victim, 0o600)
    status, body = http("POST", f"{s.base_url}/api/uploads", body=json.dumps({"size": 8, "name": "x"}).encode(),
                        headers={"Content-Type": "application/json"})
    assert status == 201, body
    upload_id = json.loads(body)["id"]
    part = Path(s.storage_dir) / upload_id / "data.part"
    part.unlink()
    part.symlink_to(victim)
    status, body = http("PUT", f"{s.base_url}/api/uploads/{upload_id}/chunks/0", body=b"OVERWRIT")
    assert status >= 400, body
    assert b"symbolic link" in body, body
    assert victim.read_bytes() == b"precious data of the pool's user\n"


def test_failed_chunks_keep_no_disk_reserved(make_stack):
    """Attacker: announces a 64 MiB chunk, sends 1 271 bytes and closes; or announces and
    sends only 1 271 bytes. Old code fallocated the whole chunk before reading the body and
    never gave it back (64 MiB allocated per try; 1.1 GB for a 1 GiB chunk)."""
    s = make_stack()
    chunk = 64 << 20
    upload_id = create(s, 2 * chunk, chunk)
    part = Path(s.storage_dir) / upload_id / "data.part"

    # Content-Length = the chunk's length, body cut short.
    c = socket.create_connection(("127.0.0.1", s.http_port))
    c.sendall((f"PUT /t/storage_chunk.php?op=put&id={upload_id}&index=0 HTTP/1.1\r\n"
               f"Host: 127.0.0.1\r\nContent-Length: {chunk}\r\n\r\n").encode() + b"x" * 1271)
    time.sleep(1.0)
    c.close()
    # Content-Length = what is sent, shorter than the chunk.
    status, body = put(s, upload_id, 1, b"y" * 1271)
    assert status == 400 and b"InvalidChunkException" in body, body
    deadline = time.time() + 10
    while time.time() < deadline:
        allocated = part.stat().st_blocks * 512
        if allocated < (1 << 20):
            break
        time.sleep(0.2)
    assert allocated < (1 << 20), f"{allocated} bytes still allocated for 2 failed chunks"
    # A good chunk still works.
    status, body = put(s, upload_id, 1, b"z" * chunk, timeout=60)
    assert status == 200, body[:300]


def test_a_second_writer_of_a_busy_chunk_gets_409_in_bounded_time(make_stack, monkeypatch):
    """Attacker: trickles chunk 0 (half of it, then nothing) and sends chunk 0 again.
    Old code made the second request wait on F_OFD_SETLKW for as long as the first one
    stayed open (forever here). Now it waits at most the lock bound (1 s in this test,
    UPLOAD_PROGRESS_LOCK_WAIT_MS) and gets InvalidChunkException code 423 (demo: 409 with
    Retry-After)."""
    monkeypatch.setenv("UPLOAD_PROGRESS_LOCK_WAIT_MS", "1000")
    s = make_stack()
    status, body = http("POST", f"{s.base_url}/api/uploads", headers={"Content-Type": "application/json"},
                        body=json.dumps({"size": 2 << 20, "name": "x", "chunk_size": 1 << 20}).encode())
    assert status == 201, body
    upload_id = json.loads(body)["id"]
    c = socket.create_connection(("127.0.0.1", s.http_port))
    try:
        c.sendall((f"PUT /api/uploads/{upload_id}/chunks/0 HTTP/1.1\r\n"
                   f"Host: 127.0.0.1\r\nCookie: {OWNER_COOKIE}\r\n"
                   f"Content-Length: {1 << 20}\r\n\r\n").encode() + b"a" * (1 << 19))
        time.sleep(1.0)  # the first writer holds chunk 0's lock now
        t = time.time()
        status, body = put(s, upload_id, 0, b"b" * (1 << 20), timeout=20)
        waited = time.time() - t
        err = json.loads(body)
        assert status == 400 and err["class"] == "UploadProgress\\InvalidChunkException", body
        assert err["code"] == 423 and "being written by another request" in err["message"], err
        assert 0.8 < waited < 5, waited
        # The demo answers 409 with Retry-After (docs/client.md).
        req = urllib.request.Request(f"{s.base_url}/api/uploads/{upload_id}/chunks/0", data=b"b" * (1 << 20),
                                     method="PUT", headers={"Cookie": OWNER_COOKIE})
        try:
            urllib.request.urlopen(req, timeout=20)
            raise AssertionError("a busy chunk was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 409 and e.headers.get("Retry-After") == "1", (e.code, dict(e.headers))
            assert b"being written by another request" in e.read()
        # Another chunk of the same upload is not held up.
        status, body = put(s, upload_id, 1, b"c" * (1 << 20), timeout=20)
        assert status == 200, body
    finally:
        c.close()
    # Once the trickler is gone the chunk can be sent.
    deadline = time.time() + 15
    while True:
        status, body = put(s, upload_id, 0, b"b" * (1 << 20), timeout=20)
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.3)
    assert status == 200, body


def test_a_fatal_error_inside_write_chunk_releases_the_chunk_lock(make_stack, monkeypatch):
    """Attacker: makes the body read inside writeChunk hit max_execution_time (php://input
    replaced by a wrapper that spins: a bailout, a longjmp over the Rust frames). Old code
    kept the chunk lock and its files open for the life of the FPM worker: every later write
    of that chunk waited forever. Now the lock, files and reserved range are released."""
    monkeypatch.setenv("UPLOAD_PROGRESS_LOCK_WAIT_MS", "3000")
    s = make_stack(fpm={"pm.max_children": "1"})  # the next request lands on the same worker
    upload_id = create(s, 4096, 4096)
    status, body = put(s, upload_id, 0, b"q" * 4096, bail=True,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 500, body
    assert "Maximum execution time" in Path(s.run_dir, "php-error.log").read_text()
    # The worker keeps no file of the upload open (old code: the lock file and data.part).
    leaked = []
    for pid in worker_pids(s):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if upload_id in os.readlink(fd):
                    leaked.append(os.readlink(fd))
            except OSError:
                pass
    assert not leaked, leaked
    t = time.time()
    status, body = put(s, upload_id, 0, b"r" * 4096, timeout=20)
    assert status == 200, body
    assert time.time() - t < 2.5, "the second writer had to wait for the lock"


def test_a_chunk_for_a_complete_upload_is_a_409_conflict(make_stack):
    """Client sends chunks after completion, of the wrong length and with a wrong checksum.
    Old code answered 200 "already stored" without looking at the body. Now
    InvalidChunkException code 409 (demo: 409, docs/client.md), the file unchanged."""
    s = make_stack()
    upload_id = create(s, 8, 4)
    assert put(s, upload_id, 0, b"abcd")[0] == 200
    assert put(s, upload_id, 1, b"efgh")[0] == 200
    status, body = http("GET", f"{s.base_url}/t/storage_chunk.php?op=complete&id={upload_id}")
    path = json.loads(body)["path"]
    for body_, headers in ((b"much too long", {}), (b"EFGH", {"X-Chunk-Checksum": "sha256:" + "0" * 64})):
        status, body = put(s, upload_id, 1, body_, headers=headers)
        err = json.loads(body)
        assert status == 400 and err["class"] == "UploadProgress\\InvalidChunkException", body
        assert err["code"] == 409 and "is complete" in err["message"], err
    assert Path(path).read_bytes() == b"abcdefgh"
