"""Hostile input against the real hub and the demo API (issue 9).

WebSocket: a small raw-socket frame fuzzer (bad opcodes, RSV bits, unmasked frames,
fragmented or oversized control frames, invalid UTF-8, oversized frames and messages,
random and mutated frames, garbage before the handshake, slowloris handshakes, 1 000
connections from one address, forged / replayed / malformed channel auth, other apps'
keys, client events, over-capacity, pong timeout). The hub must stay up with the same
pid, answer with the codes of CONTRACT.md, and come back near its baseline RSS.

HTTP: path traversal and malformed ids, hostile sizes and indexes, chunks longer or
shorter than declared, wrong or malformed checksums, a body shorter than its
Content-Length, and Pusher events API requests with bad signatures or stale
timestamps. Each gets a precise 4xx JSON answer (never a 5xx) and changes no stored
byte: a digest of the storage directory is taken before and after every request.

"Stored bytes", precisely: the name and full content of every file under storage_dir
(hub.log, hub.pid and the .sweep stamp excepted), except `data.part`, of which only the
ranges of chunks the manifest marks stored count, plus its size. The range of a chunk
that is NOT stored is scratch space by design (storage/mod.rs: a failed write leaves
the chunk missing and its bytes are overwritten by the resend).
"""
import asyncio
import base64
import hashlib
import json
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import pid_alive
from helpers import OWNER_COOKIE, Pusher, data_of, http as request, sign_channel
from test_hub import hub_up, sign_api

KEY = "upload-progress"
TRIED = {"ws": 0, "http": 0}


# ---------------------------------------------------------------------------- raw WS


def ws_handshake(port, path=f"/app/{KEY}?protocol=7&client=fuzz&version=1", host="127.0.0.1",
                 extra="", timeout=5, src=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if src:
        s.bind((src, 0))
    s.settimeout(timeout)
    s.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"{extra}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            raise ConnectionError(f"closed during handshake: {head!r}")
        head += b
    status = int(head.split(b" ", 2)[1])
    return s, status, head


def build_frame(payload, opcode=1, fin=True, mask=True, rsv=0, length=None):
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if length is None else length
    if n < 126:
        head = struct.pack("!BB", b0, (0x80 if mask else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise EOFError
        buf += b
    return buf


def recv_frame(s):
    """(opcode, payload) of the next server frame; EOFError when the socket closed."""
    b0, b1 = recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", recv_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", recv_exact(s, 8))[0]
    assert not b1 & 0x80, "server frames are never masked"
    return b0 & 0x0F, recv_exact(s, n)


class Outcome:
    def __init__(self):
        self.errors = []  # pusher:error codes
        self.sub_errors = []  # pusher:subscription_error data
        self.events = []
        self.close_code = None
        self.eof = False

    def __repr__(self):
        return f"Outcome(errors={self.errors}, close={self.close_code}, eof={self.eof}, events={self.events[-3:]})"


def drain(s, seconds=3.0, until=None):
    """Reads server frames until EOF, a close frame, `until(outcome)` or `seconds`."""
    out = Outcome()
    deadline = time.time() + seconds
    while time.time() < deadline:
        s.settimeout(max(0.05, deadline - time.time()))
        try:
            op, payload = recv_frame(s)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            out.eof = True
            break
        except (socket.timeout, TimeoutError):
            break
        if op == 8:
            out.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            try:  # answer the close, as a client must
                s.sendall(build_frame(payload[:2], opcode=8))
            except OSError:
                pass
            out.eof = True
            break
        if op == 1:
            msg = json.loads(payload)
            out.events.append(msg)
            if msg.get("event") == "pusher:error":
                out.errors.append(data_of(msg)["code"])
            if msg.get("event") == "pusher:subscription_error":
                out.sub_errors.append(data_of(msg))
        if until and until(out):
            break
    return out


def connect(port, **kw):
    s, status, head = ws_handshake(port, **kw)
    assert status == 101, head
    op, payload = recv_frame(s)
    msg = json.loads(payload)
    assert msg["event"] == "pusher:connection_established", msg
    return s, json.loads(msg["data"])["socket_id"]


def still_serving(s):
    """The connection answers a pusher:ping with a pusher:pong."""
    s.sendall(build_frame(json.dumps({"event": "pusher:ping", "data": {}}).encode()))
    out = drain(s, 3, until=lambda o: any(e.get("event") == "pusher:pong" for e in o.events))
    return any(e.get("event") == "pusher:pong" for e in out.events)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def hold_connections(port, n, src="127.0.0.1", hold=0.5):
    """Opens n raw WebSocket connections from one source address, checks every one got
    pusher:connection_established, holds them `hold` seconds, closes them."""
    key = base64.b64encode(os.urandom(16)).decode()
    req = (f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 10)
            w.write(req)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert b" 101 " in head.split(b"\r\n")[0], head
            b = await asyncio.wait_for(r.readexactly(2), 10)
            n = b[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", await r.readexactly(2))[0]
            payload = await asyncio.wait_for(r.readexactly(n), 10)
            assert b"connection_established" in payload, payload
            return w

    writers = await asyncio.gather(*[one() for _ in range(n)], return_exceptions=True)
    failed = [w for w in writers if isinstance(w, BaseException)]
    await asyncio.sleep(hold)
    for w in writers:
        if not isinstance(w, BaseException):
            w.close()
    return n - len(failed), failed[:3]


# ---------------------------------------------------------------------------- cases

def exactly(n):
    """A valid Pusher message of exactly n bytes."""
    m = json.dumps({"event": "pusher:pong", "data": ""})
    return json.dumps({"event": "pusher:pong", "data": "y" * (n - len(m))}).encode()


def _fuzz_cases():
    big = b"x" * 20000
    ok_msg = json.dumps({"event": "pusher:ping", "data": {}}).encode()
    # name, frames to send, expectation: ("close", {codes}, {pusher error codes or None})
    # or ("open", {pusher error codes}) - the connection stays usable.
    return [
        ("unmasked client frame", [build_frame(ok_msg, mask=False)], ("close", {1002}, {4000})),
        ("reserved opcode 3", [build_frame(b"x", opcode=3)], ("close", {1002}, {4000})),
        ("reserved opcode 0xB", [build_frame(b"", opcode=0xB)], ("close", {1002}, {4000})),
        ("RSV1 without extension", [build_frame(ok_msg, rsv=4)], ("close", {1002}, {4000})),
        ("RSV3", [build_frame(ok_msg, rsv=1)], ("close", {1002}, {4000})),
        ("fragmented ping", [build_frame(b"ab", opcode=9, fin=False)], ("close", {1002}, {4000})),
        ("ping payload over 125 bytes", [build_frame(b"p" * 126, opcode=9)], ("close", {1002}, {4000})),
        ("continuation without start", [build_frame(b"abc", opcode=0)], ("close", {1002}, {4000})),
        ("text frame inside a fragmented text", [build_frame(b"{", fin=False), build_frame(b"}")],
         ("close", {1002}, {4000})),
        ("close frame with 1-byte payload", [build_frame(b"\x03", opcode=8)], ("close", {1002}, None)),
        ("close frame with invalid code 999", [build_frame(struct.pack("!H", 999), opcode=8)], ("close", {1002}, None)),
        ("invalid UTF-8 text", [build_frame(b'{"event":"\xff\xfe"}')], ("close", {1007}, {4000})),
        ("UTF-8 cut between fragments", [build_frame(b'{"e":"\xe2\x82', fin=False), build_frame(b'\xffx"}', opcode=0)],
         ("close", {1007}, {4000})),
        ("frame length with the 64th bit set", [build_frame(b"", length=1 << 63)[:14]], ("close", {1002, 1009}, None)),
        ("20 KB frame header", [build_frame(big)[:14]], ("close", {1009}, {4300})),
        ("20 KB single frame", [build_frame(big)], ("close", {1009}, {4300})),
        ("16 KB message in 4 fragments", [build_frame(b"x" * 4096, fin=False)] +
         [build_frame(b"x" * 4096, opcode=0, fin=False) for _ in range(2)] + [build_frame(b"x" * 4096, opcode=0)],
         ("close", {1009}, {4300})),
        ("binary message", [build_frame(b"\x00\x01", opcode=2)], ("open", {4000})),
        ("not JSON", [build_frame(b"hello")], ("open", {4000})),
        ("JSON array", [build_frame(b"[1,2]")], ("open", {4000})),
        ("deeply nested JSON", [build_frame(b"[" * 5000 + b"]" * 5000)], ("open", {4000})),
        ("event not a string", [build_frame(b'{"event":42}')], ("open", {4000})),
        ("unknown pusher event", [build_frame(b'{"event":"pusher:nope","data":{}}')], ("open", {4000})),
        ("client event", [build_frame(b'{"event":"client-x","channel":"private-upload.a","data":{}}')], ("open", {4301})),
        ("subscribe without data", [build_frame(b'{"event":"pusher:subscribe"}')], ("open", {4000})),
        ("subscribe, channel not a string", [build_frame(b'{"event":"pusher:subscribe","data":{"channel":7}}')], ("open", {4000})),
        ("subscribe, 300-char channel", [build_frame(json.dumps({"event": "pusher:subscribe", "data": {"channel": "c" * 300}}).encode())],
         ("open", {4000})),
        ("message of exactly 10 KiB", [build_frame(exactly(10240))], ("open", set())),
        ("message of 10 KiB + 1", [build_frame(exactly(10241))], ("close", {1009}, {4300})),
        ("unsolicited pong frame", [build_frame(b"zz", opcode=0xA)], ("open", set())),
        ("ping frame", [build_frame(b"hi", opcode=9)], ("open", set())),
        ("fragmented valid message", [build_frame(ok_msg[:5], fin=False), build_frame(b"", opcode=0, fin=False),
                                      build_frame(ok_msg[5:], opcode=0)], ("open", set())),
    ]


def check_fuzz_case(port, name, frames, expect):
    s, _ = connect(port)
    try:
        for f in frames:
            try:
                s.sendall(f)
            except OSError:
                break
        out = drain(s, 4, until=lambda o: o.eof or (expect[0] == "open" and (o.errors or o.events)))
        if expect[0] == "close":
            _, codes, perr = expect
            assert out.eof, f"{name}: connection left open: {out}"
            assert out.close_code in codes, f"{name}: close code {out.close_code}, expected {codes}: {out}"
            if perr:
                assert set(out.errors) <= perr and out.errors, f"{name}: pusher:error {out.errors}, expected {perr}"
        else:
            _, perr = expect
            assert not out.eof, f"{name}: connection closed: {out}"
            assert set(out.errors) == perr, f"{name}: pusher:error {out.errors}, expected {perr}: {out}"
            assert still_serving(s), f"{name}: no pong afterwards"
    finally:
        s.close()


def random_frames(rng):
    """One sequence of random or mutated frames."""
    frames = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 5, 60, 125, 126, 300, 2000])))
        if kind < 0.3:  # fully random bytes
            frames.append(payload or b"\x00")
        elif kind < 0.7:  # random header fields
            frames.append(build_frame(payload, opcode=rng.randrange(16), fin=rng.random() < 0.7,
                                      mask=rng.random() < 0.85, rsv=rng.randrange(8) if rng.random() < 0.2 else 0))
        else:  # a valid Pusher message with a few bytes flipped
            msg = bytearray(json.dumps({"event": "pusher:subscribe", "data": {
                "channel": rng.choice(["a", "private-upload.x", "presence-y"]), "auth": "k:" + "0" * 64}}).encode())
            for _ in range(rng.randint(1, 4)):
                msg[rng.randrange(len(msg))] = rng.getrandbits(8)
            frames.append(build_frame(bytes(msg)))
    return frames


# ---------------------------------------------------------------------------- tests


def test_hostile_websocket_input(make_stack):
    s = make_stack()
    hub = hub_up(s)["pid"]
    port = s.hub_port
    ok, failed = asyncio.run(hold_connections(port, 300, hold=0.2))  # warm-up
    assert ok == 300, failed
    time.sleep(1)
    base_rss = rss_kib(hub)

    # 1. the protocol-level fuzz table
    for name, frames, expect in _fuzz_cases():
        check_fuzz_case(port, name, frames, expect)
        TRIED["ws"] += 1
        assert pid_alive(hub), f"hub died on: {name}"

    # 2. random and mutated frames: the hub answers or closes, never dies or hangs
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "9")))
    n_random = int(os.environ.get("FUZZ_RANDOM_CONNECTIONS", "300"))
    for i in range(n_random):
        c, _ = connect(port)
        try:
            for f in random_frames(rng):
                try:
                    c.sendall(f)
                except OSError:
                    break
            out = drain(c, 0.5)
            assert set(out.errors) <= {4000, 4300, 4301}, out
            if out.close_code is not None:
                # random frames may hold a close frame of ours, which the hub echoes with
                # its code (or none, 1005); what it must never do is fail internally
                assert out.close_code != 1011, out
        finally:
            c.close()
        TRIED["ws"] += 1
    assert pid_alive(hub)

    # 3. garbage before the handshake, and bad handshakes: JSON 4xx, then closed
    for name, raw, status in [
        ("binary garbage", os.urandom(600), 400),
        ("TLS client hello", bytes.fromhex("16030100a5010000a10303") + os.urandom(160), 400),
        ("HTTP/0.9 request", b"GET /\r\n\r\n", 400),
        ("head over 8 KiB", b"GET /app/x HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        ("Content-Length not a number", b"POST /apps/upload-progress/events HTTP/1.1\r\nContent-Length: zz\r\n\r\n", 400),
        ("upgrade without key", f"GET /app/{KEY} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode(), 426),
        ("WebSocket version 8", f"GET /app/{KEY} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: eA==\r\nSec-WebSocket-Version: 8\r\n\r\n".encode(), 426),
        ("POST to the app path", f"POST /app/{KEY} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode(), 426),
        ("unknown path", b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404),
    ]:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            c.sendall(raw)
            resp = b""
            try:
                while True:
                    b = c.recv(65536)
                    if not b:
                        break
                    resp += b
            except (socket.timeout, ConnectionResetError):
                pass
        finally:
            c.close()
        assert resp.startswith(b"HTTP/1.1 %d " % status), f"{name}: {resp[:200]!r}"
        body = resp.split(b"\r\n\r\n", 1)[1]
        assert "error" in json.loads(body), f"{name}: {body!r}"
        TRIED["ws"] += 1

    # 4. slowloris: one byte per second; dropped (408) within ~10 s
    c = socket.create_connection(("127.0.0.1", port), timeout=15)
    t0 = time.time()
    closed_after = None
    head = f"GET /app/{KEY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n".encode()
    resp = b""
    for b in head:
        try:
            c.sendall(bytes([b]))
        except OSError:
            closed_after = time.time() - t0
            break
        c.settimeout(1.0)
        try:
            got = c.recv(4096)
            if not got:
                closed_after = time.time() - t0
                break
            resp += got
        except (socket.timeout, TimeoutError):
            pass
        except ConnectionResetError:
            closed_after = time.time() - t0
            break
        if time.time() - t0 > 20:
            break
    c.close()
    assert closed_after is not None and closed_after <= 12.5, f"slowloris held {time.time() - t0:.1f} s"
    assert resp.startswith(b"HTTP/1.1 408 "), resp[:100]
    TRIED["ws"] += 1

    # 5. channel auth: forged, replayed, malformed, other apps' keys; wrong app key; old protocol
    secret = (Path(s.storage_dir) / ".app-secret").read_text().strip()
    a, sid_a = connect(port)
    b, sid_b = connect(port)
    chan = "private-upload.0123456789abcdefghijklmnop"
    good_a = f"{KEY}:{sign_channel(secret, sid_a, chan)}"
    auth_cases = [
        ("forged signature", f"{KEY}:{'ab' * 32}"),
        ("replayed (other socket's) auth", good_a),
        ("signature for another channel", f"{KEY}:{sign_channel(secret, sid_b, chan + 'x')}"),
        ("other app's key", f"other-app:{sign_channel(secret, sid_b, chan)}"),
        ("signed with another secret", f"{KEY}:{sign_channel('not-the-secret', sid_b, chan)}"),
        ("no colon", "garbage"),
        ("empty signature", f"{KEY}:"),
        ("non-hex signature", f"{KEY}:{'zz' * 32}"),
        ("truncated signature", f"{KEY}:{sign_channel(secret, sid_b, chan)[:-2]}"),
        ("uppercase-hex signature", f"{KEY}:{sign_channel(secret, sid_b, chan).upper()}"),
        ("8 KB auth", f"{KEY}:" + "a" * 8000),
        ("missing auth", None),
    ]
    for name, auth in auth_cases:
        data = {"channel": chan}
        if auth is not None:
            data["auth"] = auth
        b.sendall(build_frame(json.dumps({"event": "pusher:subscribe", "data": data}).encode()))
        out = drain(b, 3, until=lambda o: o.sub_errors or o.events)
        if name == "uppercase-hex signature":
            # hex is case-insensitive: the same HMAC; accepted is fine, refused is fine,
            # but never anything else
            assert out.sub_errors or any(e["event"] == "pusher_internal:subscription_succeeded" for e in out.events), out
            if not out.sub_errors:
                b.sendall(build_frame(json.dumps({"event": "pusher:unsubscribe", "data": {"channel": chan}}).encode()))
            continue
        assert len(out.sub_errors) == 1 and out.sub_errors[0]["status"] == 401 and out.sub_errors[0]["type"] == "AuthError", \
            f"{name}: {out}"
        assert not any(e["event"] == "pusher_internal:subscription_succeeded" for e in out.events), f"{name}: {out}"
        TRIED["ws"] += 1
    # presence channel with forged channel_data
    b.sendall(build_frame(json.dumps({"event": "pusher:subscribe", "data": {
        "channel": "presence-x", "auth": f"{KEY}:{sign_channel(secret, sid_b, 'presence-x')}",
        "channel_data": json.dumps({"user_id": "admin"})}}).encode()))
    out = drain(b, 3, until=lambda o: o.sub_errors or o.events)
    assert out.sub_errors and out.sub_errors[0]["status"] == 401, out
    TRIED["ws"] += 1
    # the genuine auth works on its own socket, and both connections are still usable
    a.sendall(build_frame(json.dumps({"event": "pusher:subscribe", "data": {"channel": chan, "auth": good_a}}).encode()))
    out = drain(a, 3, until=lambda o: o.events)
    assert out.events and out.events[0]["event"] == "pusher_internal:subscription_succeeded", out
    assert still_serving(a) and still_serving(b)
    # over 100 subscriptions on one connection
    for i in range(101):
        b.sendall(build_frame(json.dumps({"event": "pusher:subscribe", "data": {"channel": f"pub-{i}"}}).encode()))
    out = drain(b, 5, until=lambda o: o.sub_errors)
    assert out.sub_errors and out.sub_errors[0]["status"] == 429, out
    TRIED["ws"] += 1
    a.close()
    b.close()

    for name, path, code in [("unknown app key", "/app/someone-elses-key?protocol=7", 4001),
                             ("protocol 3", f"/app/{KEY}?protocol=3", 4007),
                             ("protocol not a number", f"/app/{KEY}?protocol=x", 4007)]:
        c, status, head = ws_handshake(port, path=path)
        assert status == 101, head
        out = drain(c, 3)
        c.close()
        assert out.errors == [code] and out.close_code == code, f"{name}: {out}"
        TRIED["ws"] += 1

    # Origin allowlist is '*' here: a hostile Origin is allowed by configuration (the
    # refusal path is covered with a real allowlist in test_limits_over_capacity_and_pong_timeout).

    # 6. 1 000 connections from one address, then closed
    ok, failed = asyncio.run(hold_connections(port, 1000, src="127.0.0.1", hold=1.0))
    assert ok == 1000, f"{ok} of 1000 connections established: {failed}"
    TRIED["ws"] += 1

    # The hub is the same process, still serving, and its memory is back near baseline.
    deadline = time.time() + 10
    while time.time() < deadline:
        status, body = request("GET", f"http://127.0.0.1:{port}/health")
        if status == 200 and json.loads(body)["connections"] == 0:
            break
        time.sleep(0.2)
    assert json.loads(body)["connections"] == 0, body
    assert hub_up(s)["pid"] == hub and pid_alive(hub)
    c = Pusher(s)
    assert c.subscribe("after-fuzz")["event"] == "pusher_internal:subscription_succeeded"
    c.close()
    time.sleep(1)
    end_rss = rss_kib(hub)
    print(f"\nhostile WS inputs tried: {TRIED['ws']} (+1000 connections); hub RSS {base_rss} KiB -> {end_rss} KiB")
    assert end_rss <= base_rss * 1.5 + 16 * 1024, f"RSS grew from {base_rss} to {end_rss} KiB"


def test_limits_over_capacity_pong_timeout_and_origin(make_stack):
    """max_connections → 4100; an unanswered pusher:ping → 4201 after the pong timeout
    (30 s in the hub); an Origin outside the allowlist → 403 before the upgrade."""
    s = make_stack(ini={"upload_progress.max_connections": "5", "upload_progress.activity_timeout": "1",
                        "upload_progress.allowed_origins": "good.example"})
    hub = hub_up(s)["pid"]
    port = s.hub_port
    # origin allowlist
    c, status, head = ws_handshake(port, extra="Origin: https://evil.example\r\n")
    c.close()
    assert status == 403, head
    TRIED["ws"] += 1
    c, status, head = ws_handshake(port, extra="Origin: https://good.example\r\n")
    assert status == 101, head
    c.close()
    # capacity
    held = [connect(port, extra="Origin: http://good.example\r\n")[0] for _ in range(5)]
    c, status, head = ws_handshake(port, extra="Origin: http://good.example\r\n")
    assert status == 101
    out = drain(c, 3)
    c.close()
    assert out.errors == [4100] and out.close_code == 4100, out
    TRIED["ws"] += 1
    # pong timeout: held[0] reads but never answers the pusher:ping
    t0 = time.time()
    out = drain(held[0], 40, until=lambda o: o.eof)
    assert any(e["event"] == "pusher:ping" for e in out.events), out
    assert out.errors == [4201] and out.close_code == 4201, out
    assert time.time() - t0 < 40
    TRIED["ws"] += 1
    for h in held:
        h.close()
    assert pid_alive(hub)


# ---------------------------------------------------------------------------- HTTP


SKIP_NAMES = {"hub.log", "hub.pid", ".sweep"}


def storage_digest(root):
    """See the module docstring: names + contents; data.part by stored chunk ranges."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(b"D" + rel.encode() + b"\0")
        for n in sorted(filenames):
            # The hub's own files (log, pid, spawn state) are not stored uploads.
            if n in SKIP_NAMES or n.startswith(".app-secret.") or (rel == "." and n.startswith("hub-")):
                continue
            p = Path(dirpath) / n
            h.update(b"F" + n.encode() + b"\0")
            if n == "data.part":
                try:
                    m = json.loads((p.parent / "manifest.json").read_bytes())
                except (OSError, ValueError):
                    m = None
                data = p.read_bytes()
                h.update(str(len(data)).encode())
                if m:
                    for i, flag in enumerate(m["stored"]):
                        if flag == "1":
                            start = i * m["chunk_size"]
                            h.update(data[start:start + m["chunk_size"]])
            else:
                h.update(p.read_bytes())
    return h.hexdigest()


def raw_http(port, raw, read=True, timeout=10):
    # Raw requests belong to the test's session too (after the request line).
    if b"\r\ncookie:" not in raw.lower():
        raw = raw.replace(b"\r\n", b"\r\nCookie: " + OWNER_COOKIE.encode() + b"\r\n", 1)
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        c.sendall(raw)
        if not read:
            return None, None
        resp = b""
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                resp += b
                if b"\r\n\r\n" in resp:
                    head, body = resp.split(b"\r\n\r\n", 1)
                    cl = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                    if cl and len(body) >= int(cl[0].split(b":")[1]):
                        break
        except socket.timeout:
            pass
    finally:
        c.close()
    head, _, body = resp.partition(b"\r\n\r\n")
    status = int(head.split(b"\r\n", 1)[0].split()[1]) if head else None
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            line, _, rest = rest.partition(b"\r\n")
            n = int(line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, body


def test_hostile_http_input_changes_no_stored_byte(make_stack):
    s = make_stack()
    hub_up(s)
    root = s.storage_dir
    J = {"Content-Type": "application/json"}
    base = s.base_url

    # one real upload with chunk 0 stored, chunk 1 missing, last chunk (2) short
    status, resp = request("POST", f"{base}/api/uploads",
                           json.dumps({"size": 2500, "name": "t.bin", "chunk_size": 1024}).encode(), J)
    assert status == 201, resp
    uid = json.loads(resp)["id"]
    c0 = os.urandom(1024)
    assert request("PUT", f"{base}/api/uploads/{uid}/chunks/0", c0)[0] == 200
    # and one complete upload
    status, resp = request("POST", f"{base}/api/uploads", json.dumps({"size": 10, "name": "d.bin"}).encode(), J)
    done = json.loads(resp)["id"]
    assert request("PUT", f"{base}/api/uploads/{done}/chunks/0", b"0123456789")[0] == 200
    assert request("POST", f"{base}/api/uploads/{done}/complete")[0] == 200
    unknown = "0" * 26

    def ck(sha):
        return {"X-Chunk-Checksum": f"sha256:{sha}"}

    cases = []  # (name, method, path, body, headers, expected status)

    def add(name, method, path, body=None, headers=None, expect=400):
        cases.append((name, method, path, body, headers or {}, expect))

    # ids: traversal and malformed, on every verb
    bad_ids = ["..", "%2E%2E", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", uid[:25], uid + "a", uid.upper(),
               uid[:25] + "A", uid[:25] + "%00", uid[:24] + "%C3%A9", "x" * 4000, "%", uid[:25] + "-",
               "..%252F", ".%2e", uid[:25] + "/"]
    for bid in bad_ids:
        # "<id>/" makes the path another (unknown) endpoint: 404 "no such endpoint"
        e = (400, 404) if bid.endswith("/") else 400
        add(f"GET id {bid[:30]}", "GET", f"/api/uploads/{bid}", expect=e)
        add(f"DELETE id {bid[:30]}", "DELETE", f"/api/uploads/{bid}", expect=e)
        add(f"complete id {bid[:30]}", "POST", f"/api/uploads/{bid}/complete", expect=e)
        add(f"PUT chunk id {bid[:30]}", "PUT", f"/api/uploads/{bid}/chunks/0", b"x" * 1024, expect=e)
    for path in ["/api/../../../etc/passwd", "/api/uploads/../../etc/passwd", "/api/%2e%2e/%2e%2e/etc/passwd",
                 f"/api/uploads/{uid}/../{done}", f"/api/uploads/{uid}/chunks/../../{done}",
                 f"/api/uploads/{uid}%2F..%2F{done}", "/api//uploads"]:
        add(f"traversal {path}", "GET", path, expect=(400, 404))
    for verb in ("GET", "DELETE", "PUT"):
        add(f"{verb} unknown well-formed id", verb, f"/api/uploads/{unknown}" + ("/chunks/0" if verb == "PUT" else ""),
            b"x" if verb == "PUT" else None, expect=404)
    add("complete unknown well-formed id", "POST", f"/api/uploads/{unknown}/complete", expect=404)
    # indexes
    for idx, expect in [("-1", 400), ("3", 400), ("99999999999999999999", 400), ("9223372036854775808", 400),
                        ("abc", 400), ("1e3", 400), ("%201", 400), ("0x1", 400), ("", 400), ("1.0", 400),
                        ("18446744073709551616", 400)]:
        add(f"chunk index {idx!r}", "PUT", f"/api/uploads/{uid}/chunks/{idx}", b"y" * 1024, expect=expect)
    # bodies and checksums
    add("chunk longer than declared", "PUT", f"/api/uploads/{uid}/chunks/1", b"L" * 1025, expect=422)
    add("chunk shorter than declared", "PUT", f"/api/uploads/{uid}/chunks/1", b"S" * 1000, expect=422)
    add("empty chunk", "PUT", f"/api/uploads/{uid}/chunks/1", b"", expect=422)
    add("last chunk too long", "PUT", f"/api/uploads/{uid}/chunks/2", b"S" * 1024, expect=422)
    add("wrong checksum", "PUT", f"/api/uploads/{uid}/chunks/1", b"W" * 1024, ck("0" * 64), expect=422)
    for hdr in ["md5:abc", "sha256:zz", "sha256:" + "a" * 63, "sha256:" + "a" * 65, "garbage",
                "sha256 " + "a" * 64, "sha256:" + "a" * 64 + "\t;x", ":" + "a" * 64, "sha256:" + "g" * 64]:
        add(f"checksum header {hdr[:20]!r}", "PUT", f"/api/uploads/{uid}/chunks/1", b"H" * 1024,
            {"X-Chunk-Checksum": hdr})
    add("re-send of a stored chunk with other bytes", "PUT", f"/api/uploads/{uid}/chunks/0", b"R" * 1024, expect=200)
    add("re-send of a stored chunk, wrong length", "PUT", f"/api/uploads/{uid}/chunks/0", b"R" * 7, expect=(200, 422))
    # InvalidChunkException code 409 (shared-host hardening): never "already stored" any more.
    add("PUT to a complete upload", "PUT", f"/api/uploads/{done}/chunks/0", b"9876543210", expect=(409,))
    add("PUT of a wrong length to a complete upload", "PUT", f"/api/uploads/{done}/chunks/0", b"1", expect=(409,))
    add("complete with missing chunks", "POST", f"/api/uploads/{uid}/complete", expect=409)
    # create: hostile sizes and options (nothing may be created)
    for body, expect in [
        ({"size": -1, "name": "n"}, 400), ({"size": 0, "name": "n"}, 400), ({"size": 2 ** 63, "name": "n"}, 413),
        ({"size": 10 ** 30, "name": "n"}, (400, 413)), ({"size": 2 ** 62, "name": "n"}, 413), ({"size": "12", "name": "n"}, 400),
        ({"size": 1.5, "name": "n"}, 400), ({"size": None}, 400), ({"name": "n"}, 400), ({"size": True}, 400),
        ({"size": 10, "chunk_size": 0}, 400), ({"size": 10, "chunk_size": -5}, 400),
        ({"size": 10, "chunk_size": 2 ** 40}, 400), ({"size": 10 ** 9, "chunk_size": 1}, 400),
        ({"size": 10, "sha256": "xyz"}, 400), ({"size": 10, "sha256": "a" * 63}, 400),
        ({"size": 10, "name": 5}, 400), ({"size": 10, "name": "n" * 2000}, 400), ({"size": 10, "name": "a\u0000b"}, 400),
        ({"size": 10, "type": "t" * 300}, 400),
    ]:
        add(f"create {json.dumps(body)[:50]}", "POST", "/api/uploads", json.dumps(body).encode(), J, expect)
    for raw, expect in [(b"", 400), (b"not json", 400), (b"[1,2]", 400), (b"{" * 100, 400), (b"x" * 70000, 413),
                        (b'{"size": 10, "size": -1}', 400), (b"\xff\xfe", 400)]:
        add(f"create body {raw[:20]!r}", "POST", "/api/uploads", raw, J, expect)
    add("create via GET", "GET", "/api/uploads", expect=405)
    add("PATCH an upload", "PATCH", f"/api/uploads/{uid}", expect=405)
    add("unknown endpoint", "GET", f"/api/uploads/{uid}/whatever", expect=404)
    # broadcasting auth
    F = {"Content-Type": "application/x-www-form-urlencoded"}
    for body, expect in [(b"", 400), (b"socket_id=1.2", 400), (b"channel_name=private-upload.x", 400),
                         (b"socket_id=1.2.3&channel_name=private-upload.x", 400),
                         (b"socket_id=a.b&channel_name=private-upload.x", 400),
                         (b"socket_id=1.2&channel_name=presence-upload.x", 403),
                         (b"socket_id=1.2&channel_name=public", 403),
                         # api.php's channel regex ends in `$` without /D, so a trailing
                         # newline passes it; auth() then refuses the name (400)
                         (b"socket_id=1.2&channel_name=private-upload.x%0A", (400, 403)),
                         (b"socket_id=1.2&channel_name=private-upload." + b"x" * 300, 403),
                         (b"socket_id[]=1&channel_name=private-upload.x", 400)]:
        add(f"auth {body[:40]!r}", "POST", "/api/broadcasting/auth", body, F, expect)
    add("auth invalid JSON", "POST", "/api/broadcasting/auth", b"{", J, 400)
    # Pusher events API through nginx (/apps/ is proxied to the hub)
    secret = (Path(root) / ".app-secret").read_text().strip()
    ev = json.dumps({"name": "x", "channels": ["c"], "data": "{}"}).encode()
    signed = sign_api(secret, KEY, f"/apps/{KEY}/events", ev)
    add("events API bad signature", "POST", signed[:-4] + "0000", ev, J, 401)
    add("events API stale timestamp", "POST", sign_api(secret, KEY, f"/apps/{KEY}/events", ev, time.time() - 700), ev, J, 401)
    add("events API future timestamp", "POST", sign_api(secret, KEY, f"/apps/{KEY}/events", ev, time.time() + 700), ev, J, 401)
    add("events API no auth", "POST", f"/apps/{KEY}/events", ev, J, 401)
    add("events API other key", "POST", sign_api(secret, "other", f"/apps/{KEY}/events", ev), ev, J, 401)
    add("events API signed by another secret", "POST", sign_api("nope", KEY, f"/apps/{KEY}/events", ev), ev, J, 401)
    add("events API body changed after signing", "POST", signed, ev.replace(b'"x"', b'"y"'), J, 401)
    add("events API unknown app", "POST", sign_api(secret, KEY, "/apps/999/events", ev), ev, J, 404)
    add("events API GET", "GET", signed, None, None, 405)
    big = json.dumps({"name": "x", "channels": ["c"], "data": "d" * 11000}).encode()
    add("events API data over 10 KiB", "POST", sign_api(secret, KEY, f"/apps/{KEY}/events", big), big, J, 413)
    huge = b"{" + b" " * 140000 + b"}"
    add("events API body over 128 KiB", "POST", sign_api(secret, KEY, f"/apps/{KEY}/events", huge), huge, J, 413)
    for body, expect in [(b"not json", 400), (json.dumps({"name": "pusher:x", "channels": ["c"]}).encode(), 400),
                         (json.dumps({"name": "x", "channels": ["bad channel"]}).encode(), 400),
                         (json.dumps({"name": "x", "channels": [f"c{i}" for i in range(101)]}).encode(), 400),
                         (json.dumps({"batch": [{"name": "x", "channel": "c"}] * 11}).encode(), 400),
                         (json.dumps({"name": "x", "channels": ["c"], "socket_id": "1.2.3"}).encode(), 400)]:
        path = f"/apps/{KEY}/batch_events" if b"batch" in body else f"/apps/{KEY}/events"
        add(f"events API signed {body[:30]!r}", "POST", sign_api(secret, KEY, path, body), body, J, expect)

    failures = []
    before = storage_digest(root)
    status_before = json.loads(request("GET", f"{base}/api/uploads/{uid}")[1])
    for name, method, path, body, headers, expect in cases:
        url = base + path
        if "%" in path or "/.." in path or "//" in path:
            # urllib would normalise nothing, but keep raw paths byte-exact anyway
            hdrs = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            raw = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{hdrs}"
                   f"Content-Length: {len(body or b'')}\r\n\r\n").encode() + (body or b"")
            status, resp = raw_http(s.http_port, raw)
        else:
            status, resp = request(method, url, body, headers)
        TRIED["http"] += 1
        exp = expect if isinstance(expect, tuple) else (expect,)
        problem = None
        if status is None or status >= 500 or status not in exp:
            problem = f"status {status}, expected {exp}"
        elif status != 204 and method != "HEAD":
            try:
                j = json.loads(resp)
                if status >= 400 and not (isinstance(j, dict) and isinstance(j.get("error"), str) and j["error"]):
                    problem = f"no error message: {resp[:120]!r}"
            except ValueError:
                problem = f"not JSON: {resp[:120]!r}"
        after = storage_digest(root)
        if after != before:
            problem = (problem or "") + " STORED BYTES CHANGED"
            before = after
        if problem:
            failures.append(f"{name}: {method} {path[:80]} -> {problem}: {(resp or b'')[:160]!r}")

    # raw-socket cases: a body shorter than its Content-Length, then close
    for name, raw in [
        ("short body then close", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n".encode() + b"Z" * 500),
        ("short body, checksum, then close", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nX-Chunk-Checksum: sha256:{hashlib.sha256(b'Z' * 1024).hexdigest()}\r\nContent-Length: 1024\r\n\r\n".encode() + b"Z" * 1000),
        ("no body then close", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n".encode()),
        ("short JSON create then close", b"POST /api/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"size\": 10"),
        ("events API short body then close", f"POST {signed} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(ev) + 50}\r\n\r\n".encode() + ev),
    ]:
        raw_http(s.http_port, raw, read=False)
        TRIED["http"] += 1
        time.sleep(0.5)
        after = storage_digest(root)
        if after != before:
            failures.append(f"{name}: STORED BYTES CHANGED")
            before = after
    for name, raw, expect in [
        ("Content-Length not a number", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".encode(), 400),
        ("negative Content-Length", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode(), 400),
        ("two Content-Lengths", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\nContent-Length: 5\r\n\r\n".encode() + b"Q" * 1024, 400),
        ("bad chunked encoding", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".encode(), 400),
        ("chunked body too long", f"PUT /api/uploads/{uid}/chunks/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n401\r\n".encode() + b"T" * 1025 + b"\r\n0\r\n\r\n", 422),
    ]:
        status, resp = raw_http(s.http_port, raw)
        TRIED["http"] += 1
        problem = None
        if status != expect:
            problem = f"status {status}, expected {expect}"
        else:
            try:
                assert json.loads(resp)["error"]
            except (ValueError, KeyError, AssertionError):
                problem = f"not a JSON error: {resp[:120]!r}"
        after = storage_digest(root)
        if after != before:
            problem = (problem or "") + " STORED BYTES CHANGED"
            before = after
        if problem:
            failures.append(f"{name}: {problem}")

    # the uploads are as they were, and still usable: resend chunk 1 and 2 and complete
    status_after = json.loads(request("GET", f"{base}/api/uploads/{uid}")[1])
    for k in ("missing", "chunks_done", "bytes_done", "state", "total_bytes"):
        assert status_after[k] == status_before[k], (k, status_before, status_after)
    c1, c2 = os.urandom(1024), os.urandom(452)
    assert request("PUT", f"{base}/api/uploads/{uid}/chunks/1", c1, ck(hashlib.sha256(c1).hexdigest()))[0] == 200
    assert request("PUT", f"{base}/api/uploads/{uid}/chunks/2", c2)[0] == 200
    status, resp = request("POST", f"{base}/api/uploads/{uid}/complete")
    assert status == 200, resp
    # no server path in the demo's JSON: the finished file is <storage_dir>/<id>/data
    assert hashlib.sha256((Path(root) / uid / "data").read_bytes()).hexdigest() == hashlib.sha256(c0 + c1 + c2).hexdigest()
    assert (Path(root) / done / "data").read_bytes() == b"0123456789"
    # nothing but the two uploads was ever created
    ids = sorted(n for n in os.listdir(root) if len(n) == 26)
    assert ids == sorted([uid, done]), ids
    print(f"\nhostile HTTP inputs tried: {TRIED['http']}; failures: {len(failures)}")
    assert not failures, "\n".join(failures)
