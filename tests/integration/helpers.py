"""Small clients used by the integration tests: HTTP via the stdlib, WebSocket
via the `websockets` package (a real, independent Pusher-protocol client)."""
import hashlib
import hmac
import json
import secrets
import time
import urllib.error
import urllib.request

from websockets.sync.client import connect


# The demo gives each upload to the browser session that created it (an HttpOnly
# cookie with 128 random bits). The tests act as one browser; a test that plays a
# second session sends another cookie (or none).
OWNER = secrets.token_hex(16)
OWNER_COOKIE = f"upload_owner={OWNER}"


def with_owner(headers=None):
    """`headers` plus this test run's session cookie (unless one is given)."""
    headers = dict(headers or {})
    if not any(k.lower() == "cookie" for k in headers):
        headers["Cookie"] = OWNER_COOKIE
    return headers


def http(method, url, body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=with_owner(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url, **kw):
    status, body = http("GET", url, **kw)
    return status, json.loads(body) if body else None


class Pusher:
    """A minimal Pusher protocol 7 client."""

    def __init__(self, stack, key="upload-progress", timeout=10, origin=None):
        url = f"ws://127.0.0.1:{stack.hub_port}/app/{key}?protocol=7&client=pytest&version=1"
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                self.ws = connect(url, open_timeout=5, origin=origin, max_size=2**20)
                break
            except (OSError, Exception) as e:  # the hub may still be starting
                last = e
                time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot connect to the hub: {last}")
        hello = self.recv(timeout)
        assert hello["event"] == "pusher:connection_established", hello
        self.socket_id = json.loads(hello["data"])["socket_id"]

    def send(self, event, data, channel=None):
        msg = {"event": event, "data": data}
        if channel:
            msg["channel"] = channel
        self.ws.send(json.dumps(msg))

    def recv(self, timeout=10):
        return json.loads(self.ws.recv(timeout=timeout))

    def subscribe(self, channel, auth=None, channel_data=None, timeout=10):
        data = {"channel": channel}
        if auth:
            data["auth"] = auth
        if channel_data:
            data["channel_data"] = channel_data
        self.send("pusher:subscribe", data)
        msg = self.recv(timeout)
        return msg

    def events(self, until, timeout=30):
        """Collects messages until `until(msg)` is true; returns the list."""
        out = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.recv(max(0.1, deadline - time.time()))
            except TimeoutError:
                break
            out.append(msg)
            if until(msg):
                return out
        raise AssertionError(f"condition not met; got {len(out)} messages: {out[-5:]}")

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


def data_of(msg):
    d = msg.get("data")
    return json.loads(d) if isinstance(d, str) else d


def sign_channel(secret, socket_id, channel):
    return hmac.new(secret.encode(), f"{socket_id}:{channel}".encode(), hashlib.sha256).hexdigest()
