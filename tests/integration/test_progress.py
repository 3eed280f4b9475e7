"""Byte-level progress of request bodies through nginx + php-fpm (issue 4)."""
import hashlib
import json
import os
import socket
import subprocess
import time

from helpers import Pusher, data_of, http
from test_hub import hub_up

SIZE = 50 * 1024 * 1024


def big_file(tmp_path, size=SIZE):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def subscribe_upload(s, c, upload_id):
    channel = f"private-upload.{upload_id}"
    status, body = http("POST", f"{s.base_url}/t/auth.php",
                        f"socket_id={c.socket_id}&channel_name={channel}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    ok = c.subscribe(channel, auth=json.loads(body)["auth"])
    assert ok["event"] == "pusher_internal:subscription_succeeded", ok
    return channel


def check_events(msgs, channel, total):
    mine = [m for m in msgs if m.get("channel") == channel]
    progress = [data_of(m) for m in mine if m["event"] == "progress"]
    terminal = [m for m in mine if m["event"] in ("complete", "failed", "aborted")]
    assert len(progress) >= 10, f"only {len(progress)} progress events"
    seqs = [p["seq"] for p in progress]
    done = [p["bytes_done"] for p in progress]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "seq strictly rising"
    assert all(a < b for a, b in zip(done, done[1:])), f"bytes_done strictly rising: {done}"
    assert all(p["bytes_total"] >= total for p in progress)
    assert all(p["state"] == "uploading" and p["chunk_count"] == 1 for p in progress)
    assert len(terminal) == 1 and terminal[0]["event"] == "complete", terminal
    assert data_of(terminal[0])["seq"] > seqs[-1]
    return progress


def test_multipart_post_progress(make_stack, tmp_path):
    s = make_stack()
    hub_up(s)
    path, digest = big_file(tmp_path)
    c = Pusher(s)
    channel = subscribe_upload(s, c, "mp1")
    out = subprocess.run(
        ["curl", "-sS", "--limit-rate", "10M", "-H", "X-Progress-ID: mp1",
         "-F", f"file=@{path}", f"{s.base_url}/t/body.php"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["kind"] == "file" and result["sha256"] == digest and result["size"] == SIZE
    msgs = c.events(lambda m: m.get("channel") == channel and m["event"] in ("complete", "failed"), timeout=30)
    check_events(msgs, channel, SIZE)
    c.close()


def test_put_progress_by_query_param(make_stack, tmp_path):
    s = make_stack()
    hub_up(s)
    path, digest = big_file(tmp_path)
    c = Pusher(s)
    channel = subscribe_upload(s, c, "put1")
    out = subprocess.run(
        ["curl", "-sS", "--limit-rate", "10M", "-T", str(path),
         f"{s.base_url}/t/body.php?X-Progress-ID=put1"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["kind"] == "raw" and result["sha256"] == digest and result["size"] == SIZE
    msgs = c.events(lambda m: m.get("channel") == channel and m["event"] in ("complete", "failed"), timeout=30)
    progress = check_events(msgs, channel, SIZE)
    assert progress[-1]["bytes_done"] <= SIZE
    # polling fallback sees the same final state
    status, body = http("GET", f"{s.base_url}/t/progress.php?id=put1")
    assert status == 200 and json.loads(body)["state"] == "complete"
    c.close()


def test_client_going_away_mid_body_yields_failed(make_stack):
    s = make_stack()
    hub_up(s)
    c = Pusher(s)
    channel = subscribe_upload(s, c, "gone1")
    sock = socket.create_connection(("127.0.0.1", s.http_port))
    sock.sendall(
        f"PUT /t/body.php HTTP/1.1\r\nHost: x\r\nX-Progress-ID: gone1\r\n"
        f"Content-Length: {SIZE}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
    for _ in range(20):
        sock.sendall(os.urandom(256 * 1024))
        time.sleep(0.02)
    sock.close()
    msgs = c.events(lambda m: m.get("channel") == channel and m["event"] in ("complete", "failed"), timeout=30)
    final = msgs[-1]
    assert final["event"] == "failed", final
    d = data_of(final)
    assert d["state"] == "failed" and "error" in d
    # no stuck state: the latest state says failed
    status, body = http("GET", f"{s.base_url}/t/progress.php?id=gone1")
    assert json.loads(body)["state"] == "failed"
    c.close()


def test_session_upload_progress_keeps_working(make_stack, tmp_path):
    s = make_stack(ini={"session.upload_progress.enabled": "1", "session.upload_progress.cleanup": "0",
                        "session.save_path": str(tmp_path), "session.upload_progress.freq": "1%"})
    hub_up(s)
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024))
    jar = tmp_path / "cookies"
    first = subprocess.run(["curl", "-sS", "-c", str(jar), f"{s.base_url}/t/session_upload.php"],
                           capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    up = subprocess.run(
        ["curl", "-sS", "-b", str(jar), "-c", str(jar), "-H", "X-Progress-ID: sess1",
         "-F", "PHP_SESSION_UPLOAD_PROGRESS=pytest", "-F", f"file=@{path}",
         f"{s.base_url}/t/session_upload.php"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    after = subprocess.run(["curl", "-sS", "-b", str(jar), f"{s.base_url}/t/session_upload.php"],
                           capture_output=True, text=True, timeout=30)
    progress = json.loads(after.stdout)["progress"]
    assert progress, f"session.upload_progress data missing: {after.stdout}\n{s.log_tail()}"
    assert progress["done"] is True and progress["bytes_processed"] >= 3 * 1024 * 1024
    assert progress["files"][0]["field_name"] == "file"
    # and our own events were produced for the same request
    status, body = http("GET", f"{s.base_url}/t/progress.php?id=sess1")
    assert json.loads(body)["state"] == "complete"
