"""Chunked, resumable uploads through nginx + php-fpm and the demo API (issue 5)."""
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import OWNER_COOKIE, Pusher, data_of, http as request, with_owner
from test_hub import hub_up
from test_progress import subscribe_upload

MiB = 1 << 20


def make_file(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(8 * MiB, left))
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def create(s, size, chunk_size, sha256=None):
    body = {"size": size, "name": "file.bin", "chunk_size": chunk_size}
    if sha256:
        body["sha256"] = sha256
    status, resp = request("POST", f"{s.base_url}/api/uploads", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
    assert status == 201, resp
    return json.loads(resp)


def put_chunk(s, upload_id, index, data, checksum=None):
    conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=120)
    headers = with_owner({"Content-Type": "application/octet-stream"})
    if checksum:
        headers["X-Chunk-Checksum"] = checksum
    conn.request("PUT", f"/api/uploads/{upload_id}/chunks/{index}", body=data, headers=headers)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, json.loads(body) if body else None


def fpm_children(s):
    out = subprocess.run(["pgrep", "-P", str(s.fpm_master_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def write_bytes_of(pids):
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def test_one_gib_parallel_shuffled_with_duplicate_and_corrupt_chunk(make_stack, tmp_path):
    s = make_stack(fpm={"pm": "static", "pm.max_children": "4"})
    hub_up(s)
    size, chunk = 1024 * MiB, 8 * MiB
    src = tmp_path / "src.bin"
    digest = make_file(src, size)
    up = create(s, size, chunk, digest)
    uid, count = up["id"], up["chunk_count"]
    assert count == 128 and up["channel"] == f"private-upload.{uid}"
    c = Pusher(s)
    subscribe_upload(s, c, uid)
    order = list(range(count))
    random.Random(7).shuffle(order)
    corrupt, dup = order[3], order[10]
    workers = fpm_children(s)
    io_before = write_bytes_of(workers)

    def send(i):
        with open(src, "rb") as f:
            f.seek(i * chunk)
            data = f.read(chunk)
        sha = "sha256:" + hashlib.sha256(data).hexdigest()
        if i == corrupt:
            bad = bytearray(data)
            bad[100] ^= 0xFF
            status, body = put_chunk(s, uid, i, bytes(bad), sha)
            assert 400 <= status < 500, (status, body)
            assert "error" in body
        status, body = put_chunk(s, uid, i, data, sha)
        assert status == 200, (i, status, body)
        if i == dup:
            status, body = put_chunk(s, uid, i, data, sha)
            assert status == 200 and i not in body["missing"], body

    t0 = time.time()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, order))
    elapsed = time.time() - t0
    status, st = request("GET", f"{s.base_url}/api/uploads/{uid}")
    st = json.loads(st)
    assert st["missing"] == [] and st["chunks_done"] == count and st["bytes_done"] == size
    status, done = request("POST", f"{s.base_url}/api/uploads/{uid}/complete")
    assert status == 200, done
    assert "path" not in json.loads(done), "no server path in JSON sent to browsers"
    path = os.path.join(s.storage_dir, uid, "data")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(16 * MiB):
            h.update(b)
    assert h.hexdigest() == digest
    # bytes written to disk per uploaded byte, from the workers' own I/O counters:
    # the data once (the corrupt and duplicate chunks add at most 2 chunks) plus manifests.
    written = write_bytes_of(workers) - io_before
    ratio = written / size
    print(f"\n1 GiB: {size / MiB / elapsed:.0f} MiB/s, written/uploaded = {ratio:.3f}")
    assert 0.99 <= ratio <= 1.0 + (2 * chunk + 4 * MiB) / size, ratio
    msgs = c.events(lambda m: m.get("event") == "complete", timeout=30)
    progress = [data_of(m) for m in msgs if m["event"] == "progress"]
    assert progress and all(a["seq"] < b["seq"] for a, b in zip(progress, progress[1:]))
    assert "path" not in data_of(msgs[-1]), "no server path in events"
    assert data_of(msgs[-1])["state"] == "complete"
    c.close()


def test_worker_killed_mid_chunk_leaves_chunk_missing_and_resend_completes(make_stack, tmp_path):
    s = make_stack(fpm={"pm": "static", "pm.max_children": "2"})
    hub_up(s)
    chunk = 8 * MiB
    data = os.urandom(2 * chunk)
    up = create(s, len(data), chunk)
    uid = up["id"]
    assert put_chunk(s, uid, 0, data[:chunk])[0] == 200
    # chunk 1 arrives slowly; all workers are SIGKILLed while it streams
    import socket
    sock = socket.create_connection(("127.0.0.1", s.http_port))
    sock.sendall(f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nCookie: {OWNER_COOKIE}\r\nContent-Length: {chunk}\r\n\r\n".encode())
    sock.sendall(data[chunk:chunk + 3 * MiB])
    time.sleep(0.5)
    for pid in fpm_children(s):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    sock.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        status, st = request("GET", f"{s.base_url}/api/uploads/{uid}")
        if status == 200:
            break
        time.sleep(0.2)
    st = json.loads(st)
    assert st["missing"] == [1], st
    assert put_chunk(s, uid, 1, data[chunk:])[0] == 200
    status, done = request("POST", f"{s.base_url}/api/uploads/{uid}/complete")
    assert status == 200, done
    # no server path in the demo's JSON: the file is <storage_dir>/<id>/data
    assert hashlib.sha256((Path(s.storage_dir) / uid / "data").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_disk_full_gives_storage_error_and_stays_resumable(make_stack, tmp_path):
    """Storage on a 24 MiB tmpfs (mounted by the test; root is required)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        import pytest
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        s = make_stack(ini={"upload_progress.storage_dir": str(mnt)})
        hub_up(s)
        chunk = 8 * MiB
        data = os.urandom(4 * chunk)  # 32 MiB does not fit in 24 MiB
        # the demo refuses sizes over the free space with 413 ...
        status, _ = request("POST", f"{s.base_url}/api/uploads", json.dumps({"size": len(data), "name": "x"}).encode(),
                            {"Content-Type": "application/json"})
        assert status == 413
        # ... so create one that fits, then fill the disk behind its back
        up = create(s, 2 * chunk, chunk)
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (14 * MiB))
        assert put_chunk(s, up["id"], 0, data[:chunk])[0] == 200
        status, body = put_chunk(s, up["id"], 1, data[chunk:2 * chunk])
        assert status == 507, (status, body)
        assert "space" in body["error"].lower() or "full" in body["error"].lower()
        st = json.loads(request("GET", f"{s.base_url}/api/uploads/{up['id']}")[1])
        assert st["missing"] == [1] and st["chunks_done"] == 1
        filler.unlink()
        assert put_chunk(s, up["id"], 1, data[chunk:2 * chunk])[0] == 200
        status, done = request("POST", f"{s.base_url}/api/uploads/{up['id']}/complete")
        assert status == 200
        assert hashlib.sha256((Path(s.storage_dir) / up["id"] / "data").read_bytes()).hexdigest() == hashlib.sha256(data[:2 * chunk]).hexdigest()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
