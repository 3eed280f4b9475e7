#!/usr/bin/env python3
"""Benchmarks of upload_progress against the anchors of /work/shared/design/TARGETS.md.

    python3 bench/run.py [--scale small|full] [--only record,hook,upload,fanout,storm]
                         [--ext target/release/libupload_progress.so] [--out docs/benchmarks.md]

Benchmarks report, they do not assert. Every measurement runs its anchor in the same
run. Results go to build/bench/results-<scale>.json and, with --out, to a markdown file.
Python 3.11 standard library only; tools/stack.py starts nginx + php-fpm.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import stack as stackmod  # noqa: E402
from stack import Stack, free_port  # noqa: E402

BENCH = os.path.join(REPO, "bench")
PHPDIR = os.path.join(BENCH, "php")
NODEDIR = os.path.join(BENCH, "node")
LOADGEN = os.path.join(BENCH, "loadgen", "target", "release", "loadgen")
PHP = shutil.which("php8.2") or "php"
MiB = 1 << 20
GiB = 1 << 30
CLK = os.sysconf("SC_CLK_TCK")

SCALES = {
    "small": dict(record_calls=10_000, hook_bytes=64 * MiB, hook_runs=1, upload_bytes=64 * MiB,
                  upload_runs=1, fanout=[1, 100], fanout_events=20, storm=200, idle_conns=100),
    "full": dict(record_calls=100_000, hook_bytes=GiB, hook_runs=5, upload_bytes=GiB,
                 upload_runs=3, fanout=[1, 1000, 15000], fanout_events=20, storm=10_000,
                 idle_conns=15000),
    # a check of the big connection counts only
    "mid": dict(record_calls=10_000, hook_bytes=64 * MiB, hook_runs=1, upload_bytes=64 * MiB,
                upload_runs=1, fanout=[15000], fanout_events=5, storm=10_000, idle_conns=15000),
}

RESULTS: dict = {}
COMMANDS: list[str] = []


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def first_line(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return "unavailable (%s)" % e


# ------------------------------------------------------------------------------ /proc

def proc_cpu_s(pid: int) -> float:
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_write_bytes(pid: int) -> int:
    try:
        with open("/proc/%d/io" % pid) as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def vm_rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Meter:
    """utime+stime and write_bytes deltas of a set of processes (found by a callable)."""

    def __init__(self, pids_fn):
        self.pids_fn = pids_fn

    def snap(self):
        return {p: (proc_cpu_s(p), proc_write_bytes(p)) for p in self.pids_fn()}

    def start(self):
        self.a = self.snap()

    def stop(self):
        b = self.snap()
        cpu = wb = 0.0
        self.by_name = {}
        for p, (c, w) in b.items():
            c0, w0 = self.a.get(p, (0.0, 0))
            cpu += c - c0
            wb += w - w0
            name = stackmod._comm(p) or "?"
            name = "hub" if name.startswith("php") and "Hub::run" in stackmod._cmdline(p) else name
            self.by_name[name] = self.by_name.get(name, 0.0) + (c - c0)
        return cpu, wb


def stack_pids(st: Stack) -> list[int]:
    pids = set()
    for pgid in st._pgids.values():
        pids.update(stackmod._group_members(pgid))
    pids.update(st.hub_pids())
    return sorted(pids)


def wait_port(port: int, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("port %d did not open" % port)


# ------------------------------------------------------------------------------ hub

class Hub:
    def __init__(self, ext, workdir, name):
        self.ext = ext
        self.port = free_port()
        self.sock = "@bench-%s-%d" % (name, os.getpid())
        self.storage = os.path.join(workdir, "hub-" + name)
        # The storage root must be the user's own and closed to group/other.
        os.makedirs(self.storage, mode=0o700, exist_ok=True)
        os.chmod(self.storage, 0o700)
        self.log = os.path.join(workdir, "hub-%s.log" % name)
        self.p = None

    def ini(self) -> list[str]:
        return ["-n", "-d", "extension=" + self.ext,
                "-d", "upload_progress.hub_socket=" + self.sock,
                "-d", "upload_progress.listen=127.0.0.1:%d" % self.port,
                "-d", "upload_progress.app_id=1",
                "-d", "upload_progress.app_key=benchkey",
                "-d", "upload_progress.app_secret=benchsecret",
                "-d", "upload_progress.storage_dir=" + self.storage,
                "-d", "upload_progress.hub=external"]

    def argv(self) -> list[str]:
        return [PHP] + self.ini() + ["-r", "UploadProgress\\Hub::run();"]

    def start(self):
        with open(self.log, "ab") as lf:
            self.p = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                      start_new_session=True)
        wait_port(self.port)
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.p and self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    @property
    def url(self):
        return "ws://127.0.0.1:%d/app/benchkey" % self.port


def php_with_ext(ext, hub: Hub | None, sockname=None) -> list[str]:
    if hub:
        return [PHP] + hub.ini()
    return [PHP, "-n", "-d", "extension=" + ext, "-d", "upload_progress.hub_socket=" + sockname,
            "-d", "upload_progress.hub=external"]


# ------------------------------------------------------------------------------ 1. record

def bench_record(cfg, ext, work):
    log("1. record one progress update")
    calls = cfg["record_calls"]
    redis_port = free_port()
    rdir = os.path.join(work, "redis")
    os.makedirs(rdir, exist_ok=True)
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", rdir, "--protected-mode", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    hub = Hub(ext, work, "record").start()
    fdir = os.path.join(work, "statefiles")
    os.makedirs(fdir, exist_ok=True)
    rows = []
    try:
        wait_port(redis_port)
        rec = os.path.join(PHPDIR, "record.php")
        runs = [
            ("UploadProgress\\publish() → running hub (array data)", php_with_ext(ext, hub) + [rec, "publish", str(calls)]),
            ("UploadProgress\\publish() → running hub (string data, json_encode in PHP)", php_with_ext(ext, hub) + [rec, "publish_str", str(calls)]),
            ("UploadProgress\\publish(), no hub (drop path)", php_with_ext(ext, None, "@bench-nohub-%d" % os.getpid()) + [rec, "publish", str(calls)]),
            ("phpredis hSet + publish (local redis-server)", [PHP, "-n", "-d", "extension=igbinary", "-d", "extension=redis", rec, "redis", str(calls), str(redis_port)]),
            ("file_put_contents(JSON, LOCK_EX)", [PHP, "-n", rec, "file", str(calls), fdir]),
            ("apcu_store (apc.enable_cli=1)", [PHP, "-n", "-d", "extension=apcu", "-d", "apc.enable_cli=1", rec, "apcu", str(calls)]),
        ]
        for label, argv in runs:
            COMMANDS.append(" ".join(argv))
            hub0 = proc_cpu_s(hub.p.pid)
            out = json.loads(sh(argv).strip().splitlines()[-1])
            if "running hub" in label:
                # what the hub spent per message it received (ingest decode + deliver)
                out["hub_us_per_msg"] = (proc_cpu_s(hub.p.pid) - hub0) * 1e6 / max(1, out["ok"] + 1000)
            out["label"] = label
            rows.append(out)
            log("  %-70s %8.0f ns (ok %d, dropped %d)" % (label, out["median_ns"], out["ok"], out["failed"]))
    finally:
        hub.kill(signal.SIGTERM)
        redis.terminate()
        redis.wait()
    RESULTS["record"] = rows


# ------------------------------------------------------------------------------ HTTP helpers

def make_data(n: int) -> bytes:
    block = os.urandom(16 * MiB)
    reps = (n + len(block) - 1) // len(block)
    return (block * reps)[:n]


# The demo ties uploads to the session cookie that created them; the benchmark is one session.
OWNER_COOKIE = "upload_owner=" + os.urandom(16).hex()


def req(conn: http.client.HTTPConnection, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers={"Cookie": OWNER_COOKIE, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError("%s %s → %d %s" % (method, path, r.status, data[:300]))
    return r, data


def make_stacks(ext, work):
    common = dict(scripts_dir=PHPDIR, fpm={"pm": "static", "pm.max_children": "4"},
                  ini={"upload_progress.app_key": "benchkey", "upload_progress.app_secret": "benchsecret",
                       "upload_progress.app_id": "1"})
    a = Stack(os.path.join(work, "stack-ext"), ext, **common).start()
    b = Stack(os.path.join(work, "stack-noext"), None, **common).start()
    return a, b


# ------------------------------------------------------------------------------ 2. hook

def bench_hook(cfg, a: Stack, b: Stack, data: bytes):
    n = cfg["hook_bytes"]
    body = memoryview(data)[:n]
    log("2. body-progress hook, %d MiB PUT, %d runs each" % (n // MiB, cfg["hook_runs"]))
    res = {"with": [], "without": []}

    cpu = {"with": [], "without": []}
    brk = {"with": {}, "without": {}}

    def one(st: Stack, hdr, key=None):
        c = http.client.HTTPConnection("127.0.0.1", st.http_port, timeout=600)
        h = {"Content-Type": "application/octet-stream"}
        if hdr:
            h["X-Progress-ID"] = "bench%d" % time.monotonic_ns()
        m = Meter(lambda: stack_pids(st))
        m.start()
        t = time.monotonic()
        _, out = req(c, "PUT", "/t/discard.php", body, h)
        dt = time.monotonic() - t
        c_s, _ = m.stop()
        c.close()
        assert int(out) == n, out
        if key:
            cpu[key].append(c_s / (n / GiB))
            for k, v in m.by_name.items():
                brk[key][k] = brk[key].get(k, 0.0) + v / (n / GiB) / cfg["hook_runs"]
        return n / dt / 1e6

    one(a, True)  # warm-up, spawns the hub
    one(b, False)
    for i in range(cfg["hook_runs"]):
        # alternate which goes first: the machine is shared and its load drifts
        order = [(a, True, "with"), (b, False, "without")]
        for st, hdr, key in (order if i % 2 == 0 else order[::-1]):
            res[key].append(one(st, hdr, key))
    res["cpu_s_per_gib"] = cpu
    res["cpu_breakdown"] = brk
    res["cpu_median_with"], res["cpu_median_without"] = statistics.median(cpu["with"]), statistics.median(cpu["without"])
    w, wo = statistics.median(res["with"]), statistics.median(res["without"])
    res["median_with"], res["median_without"] = w, wo
    res["slower_pct"] = (wo - w) / wo * 100
    res["bytes"] = n
    log("  with %.0f MB/s, without %.0f MB/s, %.2f %% slower" % (w, wo, res["slower_pct"]))
    RESULTS["hook"] = res


# ------------------------------------------------------------------------------ 3. uploads

def run_parallel(jobs, fn, nthreads=4):
    """Runs fn(conn_factory_state, job) on nthreads threads pulling from jobs."""
    lock = threading.Lock()
    jobs = list(jobs)
    errors = []

    def worker():
        state = {}
        while True:
            with lock:
                if not jobs or errors:
                    break
                job = jobs.pop(0)
            try:
                fn(state, job)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                break
        if "conn" in state:
            state["conn"].close()

    ts = [threading.Thread(target=worker) for _ in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def conn_of(state, port):
    if "conn" not in state:
        state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    return state["conn"]


def upload_demo(st: Stack, data: memoryview, checksums):
    n, cs = len(data), 8 * MiB
    c = http.client.HTTPConnection("127.0.0.1", st.http_port, timeout=600)
    _, out = req(c, "POST", "/api/uploads", json.dumps({"size": n, "name": "bench.bin", "chunk_size": cs}),
                  {"Content-Type": "application/json"})
    info = json.loads(out)
    uid, count = info["id"], info["chunk_count"]

    def put(state, i):
        h = {"Content-Type": "application/octet-stream"}
        if checksums:
            h["X-Chunk-Checksum"] = "sha256:" + checksums[i]
        req(conn_of(state, st.http_port), "PUT", "/api/uploads/%s/chunks/%d" % (uid, i),
             data[i * cs:(i + 1) * cs], h)

    run_parallel(range(count), put)
    _, out = req(c, "POST", "/api/uploads/%s/complete" % uid, b"", {"Content-Type": "application/json"})
    path = os.path.join(st.storage_dir, uid, "data")
    c.close()
    return path


def upload_plain(st: Stack, data: memoryview, _):
    n, cs = len(data), 8 * MiB
    uid = "p%d" % time.monotonic_ns()
    count = (n + cs - 1) // cs

    def put(state, i):
        req(conn_of(state, st.http_port), "PUT", "/t/plain_chunks.php?id=%s&i=%d" % (uid, i),
             data[i * cs:(i + 1) * cs], {"Content-Type": "application/octet-stream"})

    run_parallel(range(count), put)
    c = http.client.HTTPConnection("127.0.0.1", st.http_port, timeout=600)
    _, out = req(c, "POST", "/t/plain_chunks.php?id=%s&merge=%d" % (uid, count), b"")
    c.close()
    return out.decode()


def upload_tus(port: int, data: memoryview, _):
    """4 tus uploads of a quarter of the file each, in parallel, 8 MiB PATCHes
    (@tus/file-store has no concatenation extension)."""
    n, cs, parts = len(data), 8 * MiB, 4
    part = (n + parts - 1) // parts
    tus = {"Tus-Resumable": "1.0.0"}

    def one(state, k):
        c = conn_of(state, port)
        lo, hi = k * part, min(n, (k + 1) * part)
        r, _ = req(c, "POST", "/files", b"", dict(tus, **{"Upload-Length": str(hi - lo)}))
        loc = r.getheader("Location")
        path = loc[loc.index("/files"):] if "://" in loc else loc
        off = 0
        while off < hi - lo:
            chunk = data[lo + off:min(hi, lo + off + cs)]
            r, _ = req(c, "PATCH", path, chunk, dict(tus, **{"Upload-Offset": str(off),
                                                             "Content-Type": "application/offset+octet-stream"}))
            off = int(r.getheader("Upload-Offset"))

    run_parallel(range(parts), one, parts)


def bench_upload(cfg, a: Stack, b: Stack, data: bytes, work):
    n = cfg["upload_bytes"]
    body = memoryview(data)[:n]
    log("3. uploads of %d MiB in 8 MiB chunks, 4 parallel, %d runs each" % (n // MiB, cfg["upload_runs"]))
    checks = [hashlib.sha256(body[i:i + 8 * MiB]).hexdigest() for i in range(0, n, 8 * MiB)]
    tus_port = free_port()
    tus_dir = os.path.join(work, "tus-files")
    os.makedirs(tus_dir, exist_ok=True)
    COMMANDS.append("node bench/node/tus_server.mjs %d %s" % (tus_port, tus_dir))
    node = subprocess.Popen(["node", os.path.join(NODEDIR, "tus_server.mjs"), str(tus_port), tus_dir],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "tus.log"), "ab"),
                            start_new_session=True)
    try:
        wait_port(tus_port)
        variants = [
            ("Upload::writeChunk via demo API (nginx + php-fpm + extension)", a, upload_demo, None,
             lambda: stack_pids(a), lambda: [a.storage_dir]),
            ("Upload::writeChunk via demo API + X-Chunk-Checksum sha256", a, upload_demo, checks,
             lambda: stack_pids(a), lambda: [a.storage_dir]),
            ("plain PHP: php://input → chunk files + merge (no extension)", b, upload_plain, None,
             lambda: stack_pids(b), lambda: [os.path.join(b.run_dir, "tmp", "plain")]),
            ("@tus/server 2.4.5 + @tus/file-store (Node %s), 4 parallel parts" % first_line(["node", "-v"]), None,
             None, None, lambda: [node.pid], lambda: [tus_dir]),
        ]
        rows = []
        small = memoryview(data)[:8 * MiB + 12345]
        for label, st, fn, cks, pids_fn, dirs_fn in variants:
            runs = []
            go = (lambda d: upload_tus(tus_port, d, None)) if st is None else (lambda d, st=st, fn=fn, cks=cks: fn(st, d, cks))
            # warm-up with a small file (spawns the hub, opens connections)
            if st is None:
                upload_tus(tus_port, small, None)
            elif fn is upload_demo:
                upload_demo(st, small, None)
            else:
                upload_plain(st, small, None)
            for _ in range(cfg["upload_runs"]):
                for d in dirs_fn():
                    shutil.rmtree(d, ignore_errors=True)
                    os.makedirs(d, exist_ok=True)
                subprocess.run(["sync"])
                m = Meter(pids_fn)
                m.start()
                t = time.monotonic()
                go(body)
                dt = time.monotonic() - t
                cpu, wb = m.stop()
                runs.append({"mbps": n / dt / 1e6, "cpu_s_per_gib": cpu / (n / GiB), "written_per_byte": wb / n,
                             "seconds": dt, "cpu_by_process": {k: v / (n / GiB) for k, v in m.by_name.items()}})
                log("  %-66s %7.0f MB/s %5.2f CPU-s/GiB %4.2f written/B" % (label[:66], runs[-1]["mbps"],
                    runs[-1]["cpu_s_per_gib"], runs[-1]["written_per_byte"]))
            med = sorted(runs, key=lambda r: r["mbps"])[len(runs) // 2]
            rows.append({"label": label, "runs": runs, "median": med})
            for d in dirs_fn():
                shutil.rmtree(d, ignore_errors=True)
        RESULTS["upload"] = {"bytes": n, "rows": rows}
    finally:
        node.terminate()
        node.wait()


# ------------------------------------------------------------------------------ 4/5/6. hub

class Loadgen:
    def __init__(self, url, n, extra=()):
        argv = [LOADGEN, "--url", url, "--n", str(n), "--per-source", "2000"] + list(extra)
        COMMANDS.append(" ".join(argv))
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.p.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError("loadgen did not get ready: %r" % line)
        self.ok, self.failed, self.connect_ms = int(line[1]), int(line[2]), float(line[3])
        self.err = line[4] if len(line) > 4 else ""

    def cmd(self, s) -> str:
        self.p.stdin.write(s + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline()

    def close(self):
        try:
            self.p.stdin.write("QUIT\n")
            self.p.stdin.flush()
        except OSError:
            pass
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def fanout_once(server, n, events, publish_argv_fn, pid):
    interval = 50 if n <= 1000 else 500
    rss0 = vm_rss_kib(pid)
    # a channel of its own: the hub replays a channel's latest event on subscribe
    channel = "bench-%d-%d" % (n, time.monotonic_ns() % 1000000)
    lg = Loadgen(server, n, ["--channel", channel])
    time.sleep(1.0)
    rss1 = vm_rss_kib(pid)
    argv = publish_argv_fn(events, interval) + [channel]
    COMMANDS.append(" ".join(argv))
    cpu0, lcpu0 = proc_cpu_s(pid), proc_cpu_s(lg.p.pid)
    subprocess.run(argv, check=True, capture_output=True)
    out = json.loads(lg.cmd("COLLECT %d %d" % (events, 20)))
    cpu1, lcpu1 = proc_cpu_s(pid), proc_cpu_s(lg.p.pid)
    lg.close()
    out["server_cpu_ms_per_event"] = (cpu1 - cpu0) * 1e3 / events
    out["loadgen_cpu_ms_per_event"] = (lcpu1 - lcpu0) * 1e3 / events
    out.update({"requested": n, "connect_failed": lg.failed, "connect_ms": lg.connect_ms, "first_error": lg.err,
                "rss_before_kib": rss0, "rss_after_kib": rss1,
                "rss_per_conn_bytes": (rss1 - rss0) * 1024 / max(1, lg.ok)})
    return out


def bench_fanout(cfg, ext, work):
    events = cfg["fanout_events"]
    sizes = sorted(cfg["fanout"], reverse=True)  # largest first, on a fresh server: memory per connection
    log("4/5. fan-out to %s connections, %d events each" % (sizes, events))
    pub = os.path.join(PHPDIR, "fanout_pub.php")
    res = {"hub": [], "node": []}
    hub = Hub(ext, work, "fanout").start()
    COMMANDS.append(" ".join(hub.argv()) + " &")
    try:
        first = 0
        for n in sizes:
            def pargv(ev, iv, first=first):
                return php_with_ext(ext, hub) + [pub, "hub", str(ev), str(iv), str(first)]
            r = fanout_once(hub.url, n, events, pargv, hub.p.pid)
            first += events
            res["hub"].append(r)
            log("  hub  n=%-6d p50 %8.0f µs p99 %8.0f µs max %8.0f µs  %d/%d deliveries, %.0f B/conn" % (
                n, r["p50_us"], r["p99_us"], r["max_us"], r["deliveries"], r["expected"], r["rss_per_conn_bytes"]))
    finally:
        hub.kill(signal.SIGTERM)
    wsport, udpport = free_port(), free_port()
    COMMANDS.append("node bench/node/ws_server.mjs %d %d &" % (wsport, udpport))
    node = subprocess.Popen(["node", os.path.join(NODEDIR, "ws_server.mjs"), str(wsport), str(udpport)],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "ws.log"), "ab"),
                            start_new_session=True)
    try:
        wait_port(wsport)
        time.sleep(0.3)
        for n in sizes:
            def pargv(ev, iv):
                return [PHP, "-n", pub, "udp", str(ev), str(iv), "0", str(udpport)]
            r = fanout_once("ws://127.0.0.1:%d/app/benchkey" % wsport, n, events, pargv, node.pid)
            res["node"].append(r)
            log("  node n=%-6d p50 %8.0f µs p99 %8.0f µs max %8.0f µs  %d/%d deliveries, %.0f B/conn" % (
                n, r["p50_us"], r["p99_us"], r["max_us"], r["deliveries"], r["expected"], r["rss_per_conn_bytes"]))
    finally:
        node.terminate()
        node.wait()
    RESULTS["fanout"] = res


def bench_storm(cfg, ext, work):
    n = cfg["storm"]
    log("6. reconnect storm, %d clients" % n)
    pub = os.path.join(PHPDIR, "fanout_pub.php")
    hub = Hub(ext, work, "storm").start()
    lg = None
    try:
        lg = Loadgen(hub.url, n, ["--jitter-ms", "1000"])
        subprocess.run(php_with_ext(ext, hub) + [pub, "hub", "1", "0", "1"], check=True, capture_output=True)
        time.sleep(0.5)
        assert lg.cmd("ARM 2").strip() == "ARMED"
        t0 = time.monotonic_ns()
        hub.kill(signal.SIGKILL)
        t_dead = time.monotonic_ns()
        hub.start()
        t_up = time.monotonic_ns()
        subprocess.run(php_with_ext(ext, hub) + [pub, "hub", "1", "0", "2"], check=True, capture_output=True)
        t_pub = time.monotonic_ns()
        out = json.loads(lg.cmd("WAIT 120"))
        rel = lambda k: (out[k] - t0) / 1e6 if out[k] else None  # noqa: E731
        res = {"connections": lg.ok, "connect_failed": lg.failed, "initial_connect_ms": lg.connect_ms,
               "hub_dead_ms": (t_dead - t0) / 1e6, "hub_up_ms": (t_up - t0) / 1e6, "published_ms": (t_pub - t0) / 1e6,
               "reconnected": out["reconnected"], "resubscribed": out["resubscribed"], "got_latest": out["got_latest"],
               "all_reconnected_ms": rel("reconnected_max_ns"), "all_resubscribed_ms": rel("subscribed_max_ns"),
               "all_got_latest_ms": rel("got_max_ns"), "got_latest_p50_ms": rel("got_p50_ns"),
               "got_latest_p99_ms": rel("got_p99_ns"), "attempts": out["attempts"], "failures": out["failures"],
               "jitter_ms": 1000}
        log("  %s" % res)
        RESULTS["storm"] = res
    finally:
        if lg:
            lg.close()
        hub.kill(signal.SIGTERM)


# ------------------------------------------------------------------------------ report

def machine_info(ext):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    extv = first_line([PHP, "-n", "-d", "extension=" + ext, "-r", "echo UploadProgress\\version();"])
    try:
        git = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
        dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--", "src"]).strip()
        git += " (src/ has uncommitted changes)" if dirty else ""
    except Exception:  # noqa: BLE001
        git = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(), "cpu": cpu, "sha_ni": " sha_ni" in flags, "mem_gib": round(mem_kib / 1048576, 1),
        "kernel": platform.release(), "loadavg": open("/proc/loadavg").read().split()[:3],
        "php": first_line([PHP, "-v"]), "nginx": first_line(["/usr/sbin/nginx", "-v"]),
        "node": first_line(["node", "-v"]), "redis": first_line(["redis-server", "-v"]),
        "ws": "8.23.0", "tus": "@tus/server 2.4.5, @tus/file-store 2.1.1",
        "extension": extv, "git": git, "rustc": first_line(["rustc", "-V"]),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="small", choices=list(SCALES))
    ap.add_argument("--only", default="record,hook,upload,fanout,storm")
    ap.add_argument("--ext", default=os.path.join(REPO, "target", "release", "libupload_progress.so"))
    ap.add_argument("--out", default="")
    ap.add_argument("--render", default="", help="only write --out from a results JSON of an earlier run")
    args = ap.parse_args()
    if args.render:
        import report  # noqa: E402
        R = json.load(open(args.render))
        notes_path = os.path.join(BENCH, "analysis.md")
        notes = open(notes_path).read() if os.path.exists(notes_path) else ""
        md = report.render(R, notes)
        if args.out:
            with open(args.out, "w") as f:
                f.write(md)
        else:
            print(md)
        sys.exit(0)
    cfg = SCALES[args.scale]
    only = set(args.only.split(","))
    work = os.path.join(REPO, "build", "bench", args.scale)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    # a private copy: other builds may replace target/release while we run
    ext = os.path.join(work, "upload_progress.so")
    shutil.copy(args.ext, ext)
    t_start = time.monotonic()
    RESULTS["machine"] = machine_info(ext)
    RESULTS["scale"] = args.scale
    RESULTS["config"] = cfg
    log("machine", RESULTS["machine"])
    try:
        if "record" in only:
            bench_record(cfg, ext, work)
        if only & {"hook", "upload"}:
            data = make_data(max(cfg["hook_bytes"], cfg["upload_bytes"]))
            a, b = make_stacks(ext, work)
            try:
                if "hook" in only:
                    bench_hook(cfg, a, b, data)
                if "upload" in only:
                    bench_upload(cfg, a, b, data, work)
            finally:
                a.stop()
                b.stop()
            del data
        if "fanout" in only:
            bench_fanout(cfg, ext, work)
        if "storm" in only:
            bench_storm(cfg, ext, work)
    finally:
        RESULTS["commands"] = COMMANDS
        RESULTS["elapsed_s"] = time.monotonic() - t_start
        path = os.path.join(REPO, "build", "bench", "results-%s.json" % args.scale)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
        log("results in", path, "after %.0f s" % RESULTS["elapsed_s"])
    import report  # noqa: E402
    notes_path = os.path.join(BENCH, "analysis.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    md = report.render(RESULTS, notes)
    print(report.tables(RESULTS))
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        log("wrote", args.out)
