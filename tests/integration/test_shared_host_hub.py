"""Shared-host hardening of the hub, against the real hub under php-fpm + nginx.

Items of the issue: hub log flooding (3), descriptor exhaustion (5), forged
progress on an Upload's channel (6), events API replay (10), the default
origin rule (11) and control characters in event names (13)."""
import glob
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EXT, pid_alive
from helpers import Pusher, data_of, get_json, http
from test_hub import hub_up, publish, sign_api
from test_ingest_security import SYS_PYTHON, metric, nobody_prefix
from test_progress import subscribe_upload

from websockets.sync.client import connect


def hub_log(s):
    logs = glob.glob(os.path.join(s.storage_dir, "hub-*.log"))
    assert logs, os.listdir(s.storage_dir)
    return logs[0]


# Connects to the abstract ingest socket and closes, as fast as it can, for N seconds.
FLOOD = r"""
import socket, sys, time
name, secs = sys.argv[1], float(sys.argv[2])
addr = "\0" + name[1:]
n = 0
end = time.time() + secs
while time.time() < end:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(addr)
        n += 1
    except OSError:
        pass
    c.close()
print(n)
"""


def test_refused_ingest_flood_does_not_flood_the_log(make_stack):
    """Tried as another local user (nobody): connect to the hub's ingest socket
    and close, as fast as possible, for 2 s (the issue saw 127 832 refusals grow
    the log by 15 MB). Now: one line per 10 s, with the count of the others."""
    prefix = nobody_prefix()
    s = make_stack()
    info = hub_up(s)
    log = hub_log(s)
    before = os.path.getsize(log)
    errors_before = metric(s, "ingest_errors_total")
    r = subprocess.run(prefix + [SYS_PYTHON, "-c", FLOOD, info["hub_socket"], "2"],
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    tried = int(r.stdout.strip())
    assert tried > 200, tried
    deadline = time.time() + 5
    while metric(s, "ingest_errors_total") < errors_before + tried // 2 and time.time() < deadline:
        time.sleep(0.1)
    refused = metric(s, "ingest_errors_total") - errors_before
    assert refused > 100, (tried, refused)
    grown = os.path.getsize(log) - before
    assert grown < 2048, f"{refused} refusals grew the hub log by {grown} bytes"
    # After 10 s the next refusal is logged with the count of the suppressed ones.
    time.sleep(10.5)
    subprocess.run(prefix + [SYS_PYTHON, "-c", FLOOD, info["hub_socket"], "0.2"],
                   capture_output=True, text=True, timeout=30, cwd="/")
    deadline = time.time() + 5
    text = ""
    while time.time() < deadline:
        text = Path(log).read_text(errors="replace")
        if "more like it" in text:
            break
        time.sleep(0.1)
    lines = [l for l in text.splitlines() if "refused" in l and "ingest connection" in l]
    assert len(lines) == 2, lines
    assert "more like it" in lines[1], lines


def test_descriptor_flood_leaves_health_and_php_working(make_stack):
    """Tried: 70 idle TCP connections (nothing sent) to a hub whose fd limit is
    64 (FPM pool rlimit_files = 64, inherited by the hub the worker spawns).
    Before: accept() hit EMFILE, /health timed out and hub_status() said
    running=false. Now the oldest pending connections are closed to make room
    and descriptors are kept in reserve for PHP's ingest connections."""
    s = make_stack(fpm={"rlimit_files": "64"})
    info = hub_up(s)
    with open(f"/proc/{info['pid']}/limits") as f:
        limits = [l for l in f if l.startswith("Max open files")][0].split()
    assert limits[3] == "64", limits  # the hard limit is 64: nothing to raise
    c = Pusher(s)
    assert c.subscribe("fd-flood")["event"] == "pusher_internal:subscription_succeeded"
    idle = []
    try:
        for _ in range(70):
            idle.append(socket.create_connection(("127.0.0.1", s.hub_port), timeout=5))
        t0 = time.time()
        status, body = get_json(f"http://127.0.0.1:{s.hub_port}/health", timeout=5)
        assert status == 200, body
        assert time.time() - t0 < 3
        assert body["tcp_connections"] <= 40, body
        # PHP reaches the hub: hub_status() and publish() through FPM.
        st, resp = get_json(f"{s.base_url}/t/status.php")
        assert st == 200 and resp["hub"]["running"] is True, resp
        assert publish(s, "fd-flood", "still-here", {"n": 1})
        got = c.events(lambda m: m.get("event") == "still-here", timeout=10)
        assert data_of(got[-1]) == {"n": 1}
        # A new browser gets in too.
        late = Pusher(s, timeout=5)
        late.close()
        assert metric(s, "pending_evicted_total") > 0
    finally:
        for sock in idle:
            sock.close()
        c.close()


def test_hub_raises_its_soft_fd_limit_to_the_hard_limit(make_stack):
    """A hub started with soft limit 64 and hard limit 4096 (as FPM under a
    low `ulimit -Sn`) raises its soft limit at start. Before: it stayed at 64."""
    s = make_stack(ini={"upload_progress.hub": "external"})
    proc = subprocess.Popen(
        ["prlimit", "--nofile=64:4096", "php", "-n", "-c", s.php_ini_path,
         "-r", "UploadProgress\\Hub::run();"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=s.run_dir)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{s.hub_port}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        with open(f"/proc/{proc.pid}/limits") as f:
            limits = [l for l in f if l.startswith("Max open files")][0].split()
        assert limits[3:5] == ["4096", "4096"], limits
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(proc.stdout.read().decode(errors="replace")[-2000:])


def create_upload(s, size=3000, chunk=1024):
    body = json.dumps({"size": size, "name": "f.bin", "chunk_size": chunk}).encode()
    st, resp = http("POST", f"{s.base_url}/api/uploads", body, {"Content-Type": "application/json"})
    assert st == 201, resp
    return json.loads(resp)["id"]


def put_chunk(s, uid, i, n):
    st, resp = http("PUT", f"{s.base_url}/api/uploads/{uid}/chunks/{i}", b"u" * n,
                    {"Content-Type": "application/octet-stream"})
    assert st == 200, resp


@pytest.mark.parametrize("redis", [False, True], ids=["local", "redis"])
def test_tagged_request_and_publish_cannot_end_an_upload(make_stack, redis):
    """Tried: knowing an Upload's id, a 1-byte POST to a PHP script with
    `?X-Progress-ID=<id>` (before: it published `complete` on the Upload's
    channel and the hub dropped the real chunk events), then publish() of
    `complete` and of `"seq" => 1e300` on that channel (before: the seq
    silenced the channel; with Redis, for the key's lifetime). With and
    without Redis (the Lua path)."""
    s = make_stack(redis=redis)
    hub_up(s)
    uid = create_upload(s)
    c = Pusher(s)
    channel = subscribe_upload(s, c, uid)
    put_chunk(s, uid, 0, 1024)
    first = c.events(lambda m: m.get("channel") == channel and m["event"] == "progress"
                     and data_of(m)["chunks_done"] == 1)
    seq0 = data_of(first[-1])["seq"]

    # The attacker's plain tagged requests (query parameter and header).
    for extra in ({}, {"X-Progress-ID": uid}):
        url = f"{s.base_url}/t/body.php" + ("" if extra else f"?X-Progress-ID={uid}")
        st, _ = http("POST", url, b"x", {"Content-Type": "application/octet-stream", **extra})
        assert st == 200
    # publish() of an upload event, or of any data with a seq, on the channel.
    publish(s, channel, "complete", {"state": "complete"})
    publish(s, channel, "custom", {"seq": 1e300})
    publish(s, channel, "note", {"text": "scanning"})  # delivered, kept nowhere
    put_chunk(s, uid, 1, 1024)
    put_chunk(s, uid, 2, 952)
    st, resp = http("POST", f"{s.base_url}/api/uploads/{uid}/complete")
    assert st == 200, resp
    got = c.events(lambda m: m.get("channel") == channel and m["event"] == "complete", timeout=15)
    mine = [m for m in got if m.get("channel") == channel]
    names = [m["event"] for m in mine]
    assert names.count("complete") == 1 and names[-1] == "complete", names
    assert "custom" not in names, names
    seqs = [data_of(m)["seq"] for m in mine if m["event"] in ("progress", "complete")]
    assert seqs and seqs[0] > seq0 and all(a < b for a, b in zip(seqs, seqs[1:])), seqs
    prog = [data_of(m) for m in mine if m["event"] == "progress"]
    assert all(p["bytes_total"] == 3000 and p["chunk_count"] == 3 for p in prog), prog
    assert max(p["chunks_done"] for p in prog) == 3, prog
    assert metric(s, "tagged_refused_total") >= 2
    assert metric(s, "published_refused_total") >= 2
    # A plain tagged request for an id that is no Upload still gets its events.
    other = subscribe_upload(s, c, "plain-req-1")
    st, _ = http("POST", f"{s.base_url}/t/body.php?X-Progress-ID=plain-req-1", b"y" * 10,
                 {"Content-Type": "application/octet-stream"})
    assert st == 200
    c.events(lambda m: m.get("channel") == other and m["event"] == "complete", timeout=10)
    c.close()


def test_events_api_refuses_a_replayed_request(make_stack):
    """Tried: the same signed events API request sent again (before: accepted
    again for ±600 s). Now: 401 {"error": "replayed request ..."}, through the
    hub port and through nginx."""
    s = make_stack(ini={"upload_progress.app_id": "42", "upload_progress.app_key": "k1",
                        "upload_progress.app_secret": "s3cret"})
    hub_up(s)
    c = Pusher(s, key="k1")
    c.subscribe("api")
    body = json.dumps({"name": "once", "channels": ["api"], "data": "{}"}).encode()
    path = sign_api("s3cret", "k1", "/apps/42/events", body)
    hdr = {"Content-Type": "application/json"}
    assert http("POST", f"http://127.0.0.1:{s.hub_port}{path}", body, hdr)[0] == 200
    for base in (f"http://127.0.0.1:{s.hub_port}", s.base_url):
        st, resp = http("POST", base + path, body, hdr)
        assert st == 401, resp
        assert "replayed request" in json.loads(resp)["error"], resp
    c.events(lambda m: m.get("event") == "once")
    marker = json.dumps({"name": "marker", "channels": ["api"], "data": "{}"}).encode()
    assert http("POST", s.base_url + sign_api("s3cret", "k1", "/apps/42/events", marker), marker, hdr)[0] == 200
    got = c.events(lambda m: m.get("event") == "marker")
    assert not [m for m in got if m.get("event") == "once"], got
    c.close()


def ws_status(url, origin):
    try:
        ws = connect(url, open_timeout=5, origin=origin)
    except Exception as e:  # InvalidStatus carries the response
        resp = getattr(e, "response", None)
        return getattr(resp, "status_code", None) or str(e)
    hello = json.loads(ws.recv(timeout=5))
    ws.close()
    return hello["event"]


def test_default_origin_is_the_host_connected_to(make_stack):
    """Tried: a page of another site (Origin https://evil.example) opening the
    hub's WebSocket with the default settings (before: allowed_origins
    defaulted to `*`). The demo page (127.0.0.1:<demo port>) still connects to
    the hub port directly (ports are not compared) and through nginx."""
    s = make_stack()
    hub_up(s)
    page = f"http://127.0.0.1:{s.http_port}"
    direct = f"ws://127.0.0.1:{s.hub_port}/app/upload-progress?protocol=7"
    proxied = f"ws://127.0.0.1:{s.http_port}/app/upload-progress?protocol=7"
    assert ws_status(direct, page) == "pusher:connection_established"
    assert ws_status(proxied, page) == "pusher:connection_established"
    assert ws_status(direct, None) == "pusher:connection_established"
    assert ws_status(direct, "https://evil.example") == 403
    assert ws_status(proxied, "https://evil.example") == 403
    assert ws_status(direct, "null") == 403
    # `*` must be written out.
    s2 = make_stack(ini={"upload_progress.allowed_origins": "*"}, suffix="-any")
    hub_up(s2)
    assert ws_status(f"ws://127.0.0.1:{s2.hub_port}/app/upload-progress?protocol=7",
                     "https://evil.example") == "pusher:connection_established"


def test_event_names_with_control_characters_are_refused(make_stack):
    """Tried: event names with a newline, an escape and a NUL through publish()
    and the events API (before: accepted and sent to every client)."""
    s = make_stack(ini={"upload_progress.app_id": "42", "upload_progress.app_key": "k1",
                        "upload_progress.app_secret": "s3cret"})
    hub_up(s)
    code = ('foreach (["a\\nb", "x\\x1b[31m", "n\\x00"] as $e) { try { UploadProgress\\publish("c", $e, "d");'
            ' echo "accepted\\n"; } catch (ValueError $x) { echo "ValueError: ", $x->getMessage(), "\\n"; } }')
    r = subprocess.run(["php", "-n", "-c", s.php_ini_path, "-r", code], capture_output=True, text=True,
                       timeout=30)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all("control character" in l for l in lines), r.stdout + r.stderr
    for name in ("a\nb", "x\x1b[31m", "n\x00"):
        body = json.dumps({"name": name, "channels": ["c"], "data": "{}"}).encode()
        st, resp = http("POST", f"http://127.0.0.1:{s.hub_port}" + sign_api("s3cret", "k1", "/apps/42/events", body),
                        body, {"Content-Type": "application/json"})
        assert st == 400 and "control character" in json.loads(resp)["error"], resp
