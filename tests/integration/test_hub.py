"""The hub under a real php-fpm + nginx: spawned by workers, Pusher protocol 7,
supervision (kill -9, worker churn, FPM reload and stop)."""
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from conftest import pid_alive, read_hub_pid
from helpers import Pusher, data_of, get_json, http


def hub_up(stack, timeout=10):
    """A request spawns the hub (hub=auto); waits until it answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body = get_json(f"{stack.base_url}/t/status.php")
        assert status == 200, body
        if body["hub"]["running"]:
            return body["hub"]
        time.sleep(0.1)
    raise AssertionError(f"hub not running: {body}\n{stack.log_tail()}")


def publish(stack, channel, event, data):
    status, body = get_json(
        f"{stack.base_url}/t/publish.php?channel={channel}&event={event}&data={quote(json.dumps(data))}"
    )
    assert status == 200, body
    return body["ok"]


def test_script_publish_reaches_websocket_client(make_stack):
    s = make_stack()
    info = hub_up(s)
    assert info["pid"] and info["version"]
    c = Pusher(s)
    assert c.subscribe("updates")["event"] == "pusher_internal:subscription_succeeded"
    assert publish(s, "updates", "hello", {"n": 1})
    msg = c.events(lambda m: m.get("event") == "hello")[-1]
    assert msg["channel"] == "updates" and data_of(msg) == {"n": 1}
    # the hub runs detached: its parent is not the FPM worker that spawned it
    ppid = int(Path(f"/proc/{info['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != s.fpm_master_pid
    # and holds no FPM or nginx descriptors: only its own sockets, log and /dev/null
    fds = os.listdir(f"/proc/{info['pid']}/fd")
    targets = [os.readlink(f"/proc/{info['pid']}/fd/{fd}") for fd in fds]
    assert not any(s.run_dir in t and t.endswith(".sock") and "fpm" in t for t in targets), targets
    c.close()
    # the extension loads into php-fpm without any warning in the FPM log
    log = "".join(p.read_text() for p in (Path(s.run_dir) / "fpm.log", Path(s.run_dir) / "php-error.log")
                  if p.exists())
    assert not [l for l in log.splitlines() if "WARNING" in l or "ERROR" in l or "Warning" in l], log


def test_publish_array_matches_json_encode(make_stack):
    """publish() encodes PHP arrays itself; subscribers must get what json_encode says:
    lists vs objects (holes, negative and string keys), references, escapes, unicode,
    integer limits, floats, nesting."""
    s = make_stack()
    hub_up(s)
    c = Pusher(s)
    status, body = http("POST", f"{s.base_url}/t/auth.php",
                        f"socket_id={c.socket_id}&channel_name=private-upload.jsoncheck".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert c.subscribe("private-upload.jsoncheck", auth=json.loads(body)["auth"])["event"] \
        == "pusher_internal:subscription_succeeded"
    status, body = get_json(f"{s.base_url}/t/publish_json.php")
    assert status == 200 and body["ok"], body
    msg = c.events(lambda m: m.get("event") == "custom")[-1]
    assert json.loads(msg["data"]) == json.loads(body["expected"])
    c.close()


def test_private_channel_auth(make_stack):
    s = make_stack()
    hub_up(s)
    c = Pusher(s)
    status, body = http("POST", f"{s.base_url}/t/auth.php",
                        f"socket_id={c.socket_id}&channel_name=private-upload.abc".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    auth = json.loads(body)["auth"]
    assert c.subscribe("private-upload.abc", auth=auth)["event"] == "pusher_internal:subscription_succeeded"
    bad = auth[:-4] + ("0000" if not auth.endswith("0000") else "1111")
    err = c.subscribe("private-upload.other", auth=bad)
    assert err["event"] == "pusher:subscription_error", err
    # the connection stays open and usable
    c.send("pusher:ping", {})
    assert c.events(lambda m: m["event"] == "pusher:pong")
    # (progress/complete/aborted/failed and a "seq" are the upload's own there: refused)
    assert publish(s, "private-upload.abc", "note", {"x": 1})
    got = c.events(lambda m: m.get("channel") == "private-upload.abc" and m["event"] == "note")
    assert data_of(got[-1])["x"] == 1
    c.close()


def test_hub_killed_is_respawned_and_clients_get_latest_event(make_stack):
    s = make_stack()
    first = hub_up(s)["pid"]
    c = Pusher(s)
    c.subscribe("updates")
    os.kill(first, signal.SIGKILL)
    # the client sees its socket die
    try:
        c.events(lambda m: False, timeout=3)
    except Exception:
        pass
    # a publish after the kill spawns a new hub (the first publish may drop)
    deadline = time.time() + 10
    while not publish(s, "updates", "after-restart", {"n": 2}) and time.time() < deadline:
        time.sleep(0.1)
    second = hub_up(s)["pid"]
    assert second != first and pid_alive(second)
    publish(s, "updates", "after-restart", {"n": 3})
    c2 = Pusher(s)
    assert c2.subscribe("updates")["event"] == "pusher_internal:subscription_succeeded"
    msg = c2.events(lambda m: m.get("event") == "after-restart", timeout=5)[-1]
    assert data_of(msg)["n"] == 3, "latest event replayed right after subscribe"
    c2.close()


def test_worker_churn_and_reload_drop_no_connection(make_stack):
    s = make_stack(fpm={"pm": "static", "pm.max_children": "2", "pm.max_requests": "1"})
    hub = hub_up(s)["pid"]
    c = Pusher(s)
    c.subscribe("churn")
    pids = set()
    for i in range(30):
        status, body = get_json(f"{s.base_url}/t/publish.php?channel=churn&event=n&data={quote(json.dumps({'i': i}))}")
        assert status == 200
        pids.add(body["pid"])
        if i == 15:
            s.reload_fpm()
    assert len(pids) >= 10, "workers were recycled"
    got = c.events(lambda m: m.get("event") == "n" and data_of(m)["i"] == 29, timeout=10)
    seen = {data_of(m)["i"] for m in got if m.get("event") == "n"}
    assert len(seen) >= 28, f"events lost: {sorted(set(range(30)) - seen)}"
    assert read_hub_pid(s) == hub and pid_alive(hub), "the hub survived churn and reload"
    c.send("pusher:ping", {})
    assert c.events(lambda m: m["event"] == "pusher:pong")
    c.close()


def test_fpm_stop_stops_the_hub_without_zombies(make_stack):
    s = make_stack()
    hub = hub_up(s)["pid"]
    s.stop()
    deadline = time.time() + 10
    while pid_alive(hub) and time.time() < deadline:
        time.sleep(0.1)
    assert not pid_alive(hub), "hub still running after the FPM master exited"
    # Zombies are reaped by their parent; an orphaned hub belongs to init, which
    # on some machines reaps lazily, so only our own processes' zombies count.
    deadline = time.time() + 5
    while True:
        ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,comm"], capture_output=True, text=True).stdout
        zombies = [l for l in ps.splitlines()[1:] if l.split()[2].startswith("Z") and "php" in l
                   and l.split()[1] != "1"]
        if not zombies or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not zombies, zombies


def sign_api(secret, key, path, body, ts=None):
    params = {
        "auth_key": key,
        "auth_timestamp": str(int(ts if ts is not None else time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    qs = "&".join(f"{k}={params[k]}" for k in sorted(params))
    sig = hmac.new(secret.encode(), f"POST\n{path}\n{qs}".encode(), hashlib.sha256).hexdigest()
    return f"{path}?{qs}&auth_signature={sig}"


def test_pusher_http_events_api_signing(make_stack):
    s = make_stack(ini={"upload_progress.app_id": "42", "upload_progress.app_key": "k1",
                        "upload_progress.app_secret": "s3cret"})
    hub_up(s)
    c = Pusher(s, key="k1")
    c.subscribe("api")
    body = json.dumps({"name": "from-api", "channels": ["api"], "data": json.dumps({"v": 1})}).encode()
    url = f"http://127.0.0.1:{s.hub_port}" + sign_api("s3cret", "k1", "/apps/42/events", body)
    status, resp = http("POST", url, body, {"Content-Type": "application/json"})
    assert status == 200, resp
    assert data_of(c.events(lambda m: m.get("event") == "from-api")[-1]) == {"v": 1}
    bad = url[:-4] + "0000"
    assert http("POST", bad, body, {"Content-Type": "application/json"})[0] == 401
    stale = f"http://127.0.0.1:{s.hub_port}" + sign_api("s3cret", "k1", "/apps/42/events", body, time.time() - 3600)
    assert http("POST", stale, body, {"Content-Type": "application/json"})[0] == 401
    assert http("GET", f"http://127.0.0.1:{s.hub_port}/health")[0] == 200
    status, metrics = http("GET", f"http://127.0.0.1:{s.hub_port}/metrics")
    assert status == 200 and b"upload_progress_connections" in metrics
    # through nginx too (the demo proxies /apps/ to the hub)
    # (signed anew: the same signature would be refused as a replay)
    url = s.base_url + sign_api("s3cret", "k1", "/apps/42/events", body, time.time() - 1)
    assert http("POST", url, body, {"Content-Type": "application/json"})[0] == 200
    c.close()


def test_malformed_input_gets_errors_and_hub_survives(make_stack):
    """Tried: invalid JSON, a JSON array, an unknown pusher event, a client event,
    a subscribe without channel, an oversized message, a wrong app key."""
    s = make_stack()
    hub = hub_up(s)["pid"]
    c = Pusher(s)
    for raw in ["not json", "[1,2,3]", json.dumps({"event": "pusher:bogus", "data": {}}),
                json.dumps({"event": "client-typing", "channel": "updates", "data": {}}),
                json.dumps({"event": "pusher:subscribe", "data": {}})]:
        c.ws.send(raw)
        msg = c.recv()
        assert msg["event"] in ("pusher:error", "pusher:subscription_error"), (raw, msg)
    c.send("pusher:ping", {})
    assert c.events(lambda m: m["event"] == "pusher:pong")
    big = Pusher(s)
    try:
        big.ws.send("x" * 200_000)
        big.events(lambda m: m["event"] == "pusher:error", timeout=5)
    except Exception:
        pass  # closing the connection is an acceptable answer too
    wrong = None
    try:
        wrong = Pusher(s, key="nope", timeout=3)
        raise AssertionError("a wrong app key was accepted")
    except AssertionError as e:
        assert "4001" in str(e) or "pusher:error" in str(e), e
    except Exception:
        pass
    assert pid_alive(hub)
    fresh = Pusher(s)
    assert fresh.subscribe("still-ok")["event"] == "pusher_internal:subscription_succeeded"
    fresh.close()
    c.close()
