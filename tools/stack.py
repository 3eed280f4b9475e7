#!/usr/bin/env python3
"""Start and stop a real nginx + php-fpm (+ optional redis-server) stack on 127.0.0.1.

Everything runs as the current user with every runtime file (configs, pids, logs, the
FastCGI socket, temp dirs, uploads) under one directory, so several stacks can run side
by side from one checkout. Python 3.11 standard library only.

Library use (tests):

    from stack import Stack
    with Stack(tmpdir, ext_path, ini={"upload_progress.min_interval_ms": "50"}) as s:
        urllib.request.urlopen(s.base_url + "/api/config")

Command line (the Makefile's demo targets, the browser tests):

    python3 tools/stack.py up   --dir DIR --ext PATH [--http-port N] [--hub-port N] [--redis-url URL] [--ini k=v ...]
    python3 tools/stack.py down --dir DIR
    python3 tools/stack.py run  --dir DIR --ext PATH ...     # foreground until Ctrl-C
    python3 tools/stack.py hub-pid --dir DIR                 # pid(s) of the hub serving that stack
    python3 tools/stack.py status --dir DIR                  # stack.json + liveness
    python3 tools/stack.py selftest                          # proves the launcher without the extension

`up` and `run` read DEMO_DIR, DEMO_PORT (8080), HUB_PORT (6001), STORAGE_DIR, REDIS_URL,
APP_ID, APP_KEY, APP_SECRET and UPLOAD_PROGRESS_EXT from the environment when the
corresponding flags are absent.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import http.client
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DOCROOT = os.path.join(REPO, "php", "demo")
CLIENT_DIR = os.path.join(REPO, "php", "client")

__all__ = ["Stack", "StackError", "free_port", "listener_pids"]


class StackError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# process helpers (Linux /proc based, no third-party modules)
# --------------------------------------------------------------------------------------

def _which(*names: str) -> str:
    for name in names:
        if os.path.isabs(name) and os.access(name, os.X_OK):
            return name
        p = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin")
        if p:
            return p
    raise StackError("none of %s found in PATH" % ", ".join(names))


def _proc_stat(pid: int):
    """(state, ppid, pgrp) of a process, or None when it does not exist."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2:].split()
    try:
        return rest[0], int(rest[1]), int(rest[2])
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _all_pids():
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _group_members(pgid: int) -> list[int]:
    out = []
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st and st[2] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def listener_pids(port: int, host: str | None = None) -> list[int]:
    """Pids of the processes holding a listening TCP socket on `port` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or parts[3] != "0A":  # 0A = LISTEN
                        continue
                    if int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            pass
    if not inodes:
        return []
    targets = {"socket:[%s]" % i for i in inodes}
    pids = []
    for pid in _all_pids():
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in targets:
                    pids.append(pid)
                    break
            except OSError:
                continue
    return pids


def free_port(exclude: set[int] | None = None) -> int:
    exclude = exclude or set()
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise StackError("could not find a free port")


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


_PR_SET_PDEATHSIG = 1


def _preexec_pdeathsig():  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


# --------------------------------------------------------------------------------------
# cleanup of every live stack on exit / fatal signals
# --------------------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[Stack]" = weakref.WeakSet()
_HOOKS_INSTALLED = False


def _stop_all():
    for st in list(_LIVE):
        try:
            st.stop()
        except Exception:
            pass


def _install_hooks():
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            prev = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        if prev not in (signal.SIG_DFL, None):
            continue  # somebody else owns it; atexit still covers normal exits

        def handler(sig, frame, _prev=prev):
            _stop_all()
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

        try:
            signal.signal(signum, handler)
        except (ValueError, OSError):
            pass


# --------------------------------------------------------------------------------------
# config templates
# --------------------------------------------------------------------------------------

FASTCGI_PARAMS = """
    fastcgi_param  QUERY_STRING       $query_string;
    fastcgi_param  REQUEST_METHOD     $request_method;
    fastcgi_param  CONTENT_TYPE       $content_type;
    fastcgi_param  CONTENT_LENGTH     $content_length;
    fastcgi_param  SCRIPT_NAME        $fastcgi_script_name;
    fastcgi_param  DOCUMENT_URI       $document_uri;
    fastcgi_param  DOCUMENT_ROOT      $document_root;
    fastcgi_param  SERVER_PROTOCOL    $server_protocol;
    fastcgi_param  REQUEST_SCHEME     $scheme;
    fastcgi_param  GATEWAY_INTERFACE  CGI/1.1;
    fastcgi_param  SERVER_SOFTWARE    nginx/$nginx_version;
    fastcgi_param  REMOTE_ADDR        $remote_addr;
    fastcgi_param  REMOTE_PORT        $remote_port;
    fastcgi_param  SERVER_ADDR        $server_addr;
    fastcgi_param  SERVER_PORT        $server_port;
    fastcgi_param  SERVER_NAME        $server_name;
    fastcgi_param  REDIRECT_STATUS    200;
    fastcgi_param  HTTP_PROXY         "";
"""

MIME_TYPES = """
    types {
        text/html                 html htm;
        text/css                  css;
        text/plain                txt;
        application/javascript    js mjs;
        application/json          json map;
        image/svg+xml             svg;
        image/png                 png;
        image/jpeg                jpg jpeg;
        image/gif                 gif;
        image/x-icon              ico;
        font/woff2                woff2;
    }
    default_type application/octet-stream;
"""


def _fastcgi_block(sock: str, script: str, extra: str = "") -> str:
    return f"""{FASTCGI_PARAMS}
        fastcgi_param  SCRIPT_FILENAME    {script};
        fastcgi_param  REQUEST_URI        $request_uri;
        fastcgi_pass   unix:{sock};
        fastcgi_request_buffering off;
        fastcgi_buffering off;
        fastcgi_connect_timeout 10s;
        fastcgi_read_timeout 600s;
        fastcgi_send_timeout 600s;
        {extra}"""


def _proxy_block(hub: str, websocket: bool) -> str:
    ws = """
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;""" if websocket else """
        proxy_set_header Connection "";"""
    return f"""
        proxy_pass http://{hub};
        proxy_http_version 1.1;{ws}
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_connect_timeout 5s;
        proxy_read_timeout 1h;
        proxy_send_timeout 1h;"""


def _q(path: str) -> str:
    """Quote a path for nginx.conf."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ini_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    s = str(v)
    if s == "" or any(c in s for c in ' ;#=&|^!~"{}()[]$\'\\?'):
        return '"' + s.replace('"', '') + '"'
    return s


# --------------------------------------------------------------------------------------
# the stack
# --------------------------------------------------------------------------------------

class Stack:
    def __init__(self, run_dir, ext_path=None, ini=None, http_port=0, hub_port=0, fpm=None,
                 redis=False, scripts_dir=None, docroot=None):
        self.run_dir = os.path.abspath(str(run_dir))
        self.ext_path = os.path.abspath(str(ext_path)) if ext_path else None
        self.ini = {str(k): v for k, v in (ini or {}).items()}
        self._want_http_port = int(http_port or 0)
        self._want_hub_port = int(hub_port or 0)
        self.fpm_pool = {"pm": "static", "pm.max_children": "4"}
        if fpm:
            self.fpm_pool.update({str(k): str(v) for k, v in fpm.items()})
        self.redis = bool(redis)
        self.scripts_dir = os.path.abspath(str(scripts_dir)) if scripts_dir else None
        self.docroot = os.path.abspath(str(docroot)) if docroot else DEFAULT_DOCROOT
        self.http_port = self._want_http_port
        self.hub_port = self._want_hub_port
        self.redis_port = None
        sd = self.ini.get("upload_progress.storage_dir")
        self.storage_dir = os.path.abspath(str(sd)) if sd else os.path.join(self.run_dir, "storage")
        self.redis_url = self.ini.get("upload_progress.redis_url") or None
        self.fpm_master_pid = None
        self.nginx_pid = None
        self.redis_pid = None
        self._procs = {}  # name -> Popen
        self._pgids = {}  # name -> pgid
        self._hub_pids_seen = set()
        self._started = False
        self._stopping = threading.Lock()
        self.detached = False  # True: leave processes running when this Python process exits

    # ---- paths --------------------------------------------------------------------
    def _p(self, *names) -> str:
        return os.path.join(self.run_dir, *names)

    @property
    def base_url(self) -> str:
        return "http://127.0.0.1:%d" % self.http_port

    @property
    def fpm_socket(self) -> str:
        # sun_path holds 107 bytes and FPM truncates longer names silently; a deep
        # checkout (CI clones far from /) must not break the stack.
        path = self._p("fpm.sock")
        if len(path.encode()) <= 100:
            return path
        digest = hashlib.sha1(self.run_dir.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "upst-%d-%s.sock" % (os.getuid(), digest))

    @property
    def php_ini_path(self) -> str:
        return self._p("php.ini")

    @property
    def hub_listen(self) -> str:
        return "127.0.0.1:%d" % self.hub_port

    # ---- config writing -------------------------------------------------------------
    def _ini_directives(self) -> dict:
        d = {
            "memory_limit": "256M",
            "max_execution_time": "0",
            "max_input_time": "-1",
            "post_max_size": "0",
            "upload_max_filesize": "16G",
            "output_buffering": "0",
            "display_errors": "Off",
            "display_startup_errors": "Off",
            "log_errors": "On",
            "error_reporting": "32767",
            "error_log": self._p("php-error.log"),
            "expose_php": "Off",
            "date.timezone": "UTC",
            "session.save_path": self._p("sessions"),
            "sys_temp_dir": self._p("tmp"),
            "upload_tmp_dir": self._p("tmp"),
        }
        d["upload_progress.listen"] = self.hub_listen
        d["upload_progress.storage_dir"] = self.storage_dir
        if self.redis_url:
            d["upload_progress.redis_url"] = self.redis_url
        for k, v in self.ini.items():
            if k == "upload_progress.storage_dir":
                v = self.storage_dir
            d[k] = v
        return d

    def _write_php_ini(self):
        lines = ["; generated by tools/stack.py"]
        if self.ext_path:
            lines.append("extension=%s" % _ini_value(self.ext_path))
        for k, v in self._ini_directives().items():
            lines.append("%s = %s" % (k, _ini_value(v)))
        # may hold upload_progress.app_secret: readable by this user only
        fd = os.open(self.php_ini_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.php_ini_path, 0o600)

    def _write_fpm_conf(self):
        root = os.geteuid() == 0
        pool = dict(self.fpm_pool)
        lines = [
            "; generated by tools/stack.py",
            "[global]",
            "pid = %s" % self._p("fpm.pid"),
            "error_log = %s" % self._p("fpm.log"),
            "log_level = notice",
            "daemonize = no",
            "process_control_timeout = 10s",
            "",
            "[www]",
        ]
        if root:
            lines += ["user = root", "group = root"]
        lines += [
            "listen = %s" % self.fpm_socket,
            "listen.mode = 0660",
            "listen.backlog = 511",
            "catch_workers_output = yes",
            "decorate_workers_output = no",
            "clear_env = no",
            "request_terminate_timeout = 0",
        ]
        if pool.get("pm") == "dynamic":
            n = int(pool.get("pm.max_children", "4"))
            pool.setdefault("pm.start_servers", str(max(1, n // 2)))
            pool.setdefault("pm.min_spare_servers", "1")
            pool.setdefault("pm.max_spare_servers", str(max(1, n // 2)))
        for k, v in pool.items():
            lines.append("%s = %s" % (k, v))
        with open(self._p("php-fpm.conf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _write_nginx_conf(self):
        root = os.geteuid() == 0
        hub = "127.0.0.1:%d" % self.hub_port
        sock = self.fpm_socket
        api = os.path.join(self.docroot, "api.php")
        tmp = self._p("nginx-tmp")
        scripts = ""
        if self.scripts_dir:
            scripts = f"""
        location ~ ^/t/(?<t_rest>.+)$ {{
            set $t_dir {_q(self.scripts_dir)};
            {_fastcgi_block(sock, "$t_dir/$t_rest")}
        }}"""
        conf = f"""# generated by tools/stack.py
{"user root root;" if root else ""}
worker_processes 2;
daemon off;
master_process on;
pid {_q(self._p("nginx.pid"))};
error_log {_q(self._p("nginx-error.log"))} notice;
worker_rlimit_nofile 16384;

events {{
    worker_connections 8192;
}}

http {{
{MIME_TYPES}
    access_log {_q(self._p("nginx-access.log"))};
    client_body_temp_path {_q(os.path.join(tmp, "client_body"))};
    proxy_temp_path {_q(os.path.join(tmp, "proxy"))};
    fastcgi_temp_path {_q(os.path.join(tmp, "fastcgi"))};
    uwsgi_temp_path {_q(os.path.join(tmp, "uwsgi"))};
    scgi_temp_path {_q(os.path.join(tmp, "scgi"))};
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    server_tokens off;
    client_max_body_size 0;
    client_body_buffer_size 1m;
    client_body_timeout 600s;
    send_timeout 600s;
    large_client_header_buffers 4 64k;

    # 1 when the raw request URI is under /api (whatever its normalised form); not for the
    # internal redirect of error_page (/__bad_request).
    map $request_uri $raw_api {{
        "~^/api(/|\\?|$)" 1;
        default 0;
    }}
    map "$raw_api$uri" $api_front {{
        volatile;
        "1/__bad_request" 0;
        "~^1" 1;
        default 0;
    }}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{self.http_port} default_server;
        server_name _;
        root {_q(self.docroot)};
        index index.html;
        charset utf-8;

        # Every request whose raw URI starts with /api goes to the front controller,
        # whatever the normalised path would be (/api/../x, %2F, ...).
        if ($api_front) {{
            rewrite ^ /__api_front last;
        }}
        location = /__api_front {{
            internal;
            {_fastcgi_block(sock, _q(api))}
        }}
        location ^~ /api/ {{
            {_fastcgi_block(sock, _q(api))}
        }}
        location = /api {{
            {_fastcgi_block(sock, _q(api))}
        }}
        location = /api.php {{ return 404; }}

        # Errors nginx detects itself before any location (malformed request line ...)
        error_page 400 /__bad_request;
        location = /__bad_request {{
            internal;
            default_type application/json;
            return 400 '{{"error":"malformed request"}}';
        }}

        location ^~ /app/ {{{_proxy_block(hub, True)}
        }}
        location ^~ /apps/ {{{_proxy_block(hub, False)}
        }}
        location = /health {{{_proxy_block(hub, False)}
        }}
        location = /metrics {{{_proxy_block(hub, False)}
        }}
        location ^~ /client/ {{
            alias {_q(CLIENT_DIR + "/")};
            add_header Cache-Control "no-cache";
        }}{scripts}
        location ~ \\.php$ {{ return 404; }}
        location / {{
            try_files $uri $uri/ =404;
            add_header Cache-Control "no-cache";
        }}
    }}
}}
"""
        with open(self._p("nginx.conf"), "w") as f:
            f.write(conf)

    # ---- lifecycle --------------------------------------------------------------------
    def _spawn(self, name, argv, log):
        logf = open(log, "ab")
        kwargs = dict(stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                      cwd=self.run_dir, start_new_session=True, close_fds=True)
        if not self.detached and threading.current_thread() is threading.main_thread():
            kwargs["preexec_fn"] = _preexec_pdeathsig
        try:
            p = subprocess.Popen(argv, **kwargs)
        finally:
            logf.close()
        self._procs[name] = p
        self._pgids[name] = p.pid  # setsid: the child leads its own group
        return p

    def start(self):
        if self._started:
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        for d in ("storage", "sessions", "tmp", "nginx-tmp"):
            os.makedirs(self._p(d), mode=0o700, exist_ok=True)
        os.makedirs(self.storage_dir, mode=0o700, exist_ok=True)
        if self.docroot and not os.path.isdir(self.docroot):
            os.makedirs(self.docroot, exist_ok=True)
        taken = set()
        if not self.http_port:
            self.http_port = free_port(taken)
        taken.add(self.http_port)
        if not self.hub_port:
            self.hub_port = free_port(taken)
        taken.add(self.hub_port)
        _install_hooks()
        if not self.detached:
            _LIVE.add(self)
        self._started = True
        try:
            if self.redis:
                self._start_redis(taken)
            self._write_php_ini()
            self._write_fpm_conf()
            self._write_nginx_conf()
            self._start_fpm()
            self._start_nginx()
            self._wait_http()
        except BaseException as e:
            tail = self.log_tail(40)
            try:
                self.stop()
            finally:
                pass
            if isinstance(e, StackError):
                raise StackError("%s\n--- logs (%s) ---\n%s" % (e, self.run_dir, tail)) from None
            raise
        return self

    def _start_redis(self, taken):
        self.redis_port = free_port(taken)
        taken.add(self.redis_port)
        exe = _which("redis-server")
        argv = [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.run_dir, "--daemonize", "no",
                "--pidfile", self._p("redis.pid"), "--logfile", self._p("redis.log"),
                "--protected-mode", "no"]
        p = self._spawn("redis", argv, self._p("redis.out"))
        self.redis_pid = p.pid
        self.redis_url = "redis://127.0.0.1:%d" % self.redis_port
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise StackError("redis-server exited with %s" % p.returncode)
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise StackError("redis-server did not answer on port %d" % self.redis_port)

    def _fpm_argv(self):
        # PHP_VERSION (default 8.2) picks php-fpmX.Y: the test legs of other versions set it.
        ver = os.environ.get("PHP_VERSION") or "8.2"
        exe = _which("php-fpm" + ver, "/usr/sbin/php-fpm" + ver)
        argv = [exe, "-n", "-c", self.php_ini_path, "-y", self._p("php-fpm.conf"), "-F"]
        if os.geteuid() == 0:
            argv.append("-R")
        return argv

    def _fpm_ready_count(self) -> int:
        try:
            with open(self._p("fpm.log"), "rb") as f:
                return f.read().count(b"ready to handle connections")
        except OSError:
            return 0

    def _start_fpm(self):
        try:
            os.unlink(self.fpm_socket)
        except FileNotFoundError:
            pass
        before = self._fpm_ready_count()
        p = self._spawn("fpm", self._fpm_argv(), self._p("fpm.out"))
        self.fpm_master_pid = p.pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise StackError("php-fpm exited with %s" % p.returncode)
            if os.path.exists(self.fpm_socket) and self._fpm_ready_count() > before:
                return
            time.sleep(0.05)
        raise StackError("php-fpm did not become ready")

    def _start_nginx(self):
        exe = _which("/usr/sbin/nginx", "nginx")
        argv = [exe, "-p", self.run_dir + "/", "-c", self._p("nginx.conf"), "-e", self._p("nginx-error.log")]
        p = self._spawn("nginx", argv, self._p("nginx.out"))
        self.nginx_pid = p.pid

    def _wait_http(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            p = self._procs.get("nginx")
            if p is not None and p.poll() is not None:
                raise StackError("nginx exited with %s" % p.returncode)
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2)
                c.request("GET", "/__stack_probe")
                r = c.getresponse()
                r.read()
                c.close()
                return
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise StackError("nginx did not answer on port %d (%s)" % (self.http_port, last))

    def reload_fpm(self, timeout=20.0):
        """SIGUSR2 to the fpm master (same pid afterwards) and wait until it serves again."""
        if not _alive(self.fpm_master_pid):
            raise StackError("php-fpm master is not running")
        before = self._fpm_ready_count()
        os.kill(self.fpm_master_pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(self.fpm_master_pid):
                raise StackError("php-fpm master died during reload\n" + self.log_tail(30))
            if self._fpm_ready_count() > before and os.path.exists(self.fpm_socket):
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(2)
                    s.connect(self.fpm_socket)
                    s.close()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise StackError("php-fpm did not come back after reload\n" + self.log_tail(30))

    # ---- hub ------------------------------------------------------------------------
    def hub_pids(self) -> list[int]:
        """Pids of the hub serving this stack (listening on hub_port, or named in storage_dir/hub.pid)."""
        pids = set()
        if self.hub_port:
            for pid in listener_pids(self.hub_port):
                if self._looks_like_hub(pid):
                    pids.add(pid)
        try:
            with open((glob.glob(os.path.join(self.storage_dir, "hub-*.pid")) or ["/nonexistent"])[0]) as f:
                pid = int(f.read().split()[0])
            if _alive(pid) and self._looks_like_hub(pid):
                pids.add(pid)
        except (OSError, ValueError, IndexError):
            pass
        self._hub_pids_seen |= pids
        return sorted(pids)

    @staticmethod
    def _looks_like_hub(pid: int) -> bool:
        comm = _comm(pid)
        cmd = _cmdline(pid)
        if comm.startswith(("nginx", "redis")) or "php-fpm" in cmd:
            return False
        return "Hub::run" in cmd or comm.startswith("php")

    # ---- stop ---------------------------------------------------------------------------
    def _stop_group(self, name, pgid, first_sig, expect, timeout):
        proc = self._procs.get(name)
        if pgid is None:
            return

        def members():
            ms = _group_members(pgid)
            return [m for m in ms if any(e in (_comm(m) + " " + _cmdline(m)) for e in expect)]

        if not members():
            if proc is not None:
                proc.poll()
            return
        try:
            os.killpg(pgid, first_sig)
        except (ProcessLookupError, PermissionError):
            for m in members():
                _signal(m, first_sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            if not members():
                return
            time.sleep(0.05)
        for m in members():
            _signal(m, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            if not members():
                return
            time.sleep(0.05)

    def _stop_hub(self, timeout=3.0):
        pids = set(self.hub_pids()) | {p for p in self._hub_pids_seen if _alive(p) and self._looks_like_hub(p)}
        if not pids:
            return
        # The hub exits by itself when the fpm master is gone; give it a moment, then insist.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        for p in pids:
            if _alive(p):
                _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        for p in pids:
            if _alive(p):
                _signal(p, signal.SIGKILL)

    def stop(self):
        with self._stopping:
            if not self._started and not self._pgids:
                return
            try:
                if self.hub_port:
                    self.hub_pids()  # remember them before fpm goes away
            except Exception:
                pass
            self._stop_group("nginx", self._pgids.get("nginx"), signal.SIGTERM, ("nginx",), 5)
            self._stop_group("fpm", self._pgids.get("fpm"), signal.SIGTERM, ("php-fpm",), 8)
            try:
                self._stop_hub()
            except Exception:
                pass
            self._stop_group("redis", self._pgids.get("redis"), signal.SIGTERM, ("redis",), 5)
            if not self.fpm_socket.startswith(self.run_dir + os.sep):
                try:
                    os.unlink(self.fpm_socket)
                except OSError:
                    pass
            for p in self._procs.values():
                try:
                    p.wait(timeout=0.1)
                except Exception:
                    pass
            self._procs.clear()
            self._pgids.clear()
            self._started = False
            _LIVE.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def __del__(self):
        try:
            if self._started and not self.detached:
                self.stop()
        except Exception:
            pass

    # ---- logs ---------------------------------------------------------------------------
    def log_tail(self, n=50) -> str:
        parts = []
        for label, path in (("php-fpm", self._p("fpm.log")), ("php-fpm stdout", self._p("fpm.out")),
                            ("php errors", self._p("php-error.log")),
                            ("nginx", self._p("nginx-error.log")), ("nginx stdout", self._p("nginx.out")),
                            ("redis", self._p("redis.log")),
                            ("hub", (glob.glob(os.path.join(self.storage_dir, "hub-*.log")) or [os.path.join(self.storage_dir, "hub.log")])[0])):
            t = _tail(path, n)
            if t.strip():
                parts.append("==> %s (%s) <==\n%s" % (label, path, t))
        return "\n".join(parts)

    # ---- state file (CLI up/down) ---------------------------------------------------
    def state(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "ext_path": self.ext_path,
            "http_port": self.http_port,
            "hub_port": self.hub_port,
            "base_url": self.base_url,
            "storage_dir": self.storage_dir,
            "redis_url": self.redis_url,
            "redis_port": self.redis_port,
            "fpm_master_pid": self.fpm_master_pid,
            "nginx_pid": self.nginx_pid,
            "redis_pid": self.redis_pid,
            "pgids": dict(self._pgids),
            "php_ini": self.php_ini_path,
            "docroot": self.docroot,
        }

    @classmethod
    def from_state(cls, st: dict) -> "Stack":
        s = cls(st["run_dir"], st.get("ext_path"), http_port=st.get("http_port", 0),
                hub_port=st.get("hub_port", 0), docroot=st.get("docroot"))
        s.storage_dir = st.get("storage_dir") or s.storage_dir
        s.redis_url = st.get("redis_url")
        s.redis_port = st.get("redis_port")
        s.fpm_master_pid = st.get("fpm_master_pid")
        s.nginx_pid = st.get("nginx_pid")
        s.redis_pid = st.get("redis_pid")
        s._pgids = {k: int(v) for k, v in (st.get("pgids") or {}).items() if v}
        s._started = True
        s.detached = True
        return s


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def _default_ext():
    env = os.environ.get("UPLOAD_PROGRESS_EXT")
    if env:
        return env
    for cand in (os.path.join(REPO, "target", "release", "libupload_progress.so"),
                 os.path.join(REPO, "target", "release", "upload_progress.so"),
                 os.path.join(REPO, "build", "upload_progress.so")):
        if os.path.exists(cand):
            return cand
    return None


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "run"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=os.environ.get("DEMO_DIR") or ".demo")
        p.add_argument("--ext", default=None, help="path of the extension .so ('' or 'none': without it)")
        p.add_argument("--http-port", type=int, default=None)
        p.add_argument("--hub-port", type=int, default=None)
        p.add_argument("--redis-url", default=None)
        p.add_argument("--redis", action="store_true", help="start a private redis-server")
        p.add_argument("--storage-dir", default=None)
        p.add_argument("--scripts-dir", default=None)
        p.add_argument("--docroot", default=None)
        p.add_argument("--ini", action="append", default=[], metavar="K=V")
        p.add_argument("--fpm", action="append", default=[], metavar="K=V", help="pool override, e.g. pm.max_children=8")
    for name in ("down", "hub-pid", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=os.environ.get("DEMO_DIR") or ".demo")
    return ap.parse_args(argv)


def _kv(items):
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit("expected K=V, got %r" % it)
        k, v = it.split("=", 1)
        out[k.strip()] = v
    return out


def _build_from_args(a, detached):
    env = os.environ
    ext = a.ext if a.ext is not None else _default_ext()
    if ext in ("", "none", "None"):
        ext = None
    if ext and not os.path.exists(ext):
        raise SystemExit("extension not found: %s" % ext)
    http_port = a.http_port if a.http_port is not None else int(env.get("DEMO_PORT") or 8080)
    hub_port = a.hub_port if a.hub_port is not None else int(env.get("HUB_PORT") or 6001)
    ini = {}
    for var, directive in (("APP_ID", "upload_progress.app_id"), ("APP_KEY", "upload_progress.app_key"),
                           ("APP_SECRET", "upload_progress.app_secret")):
        if env.get(var):
            ini[directive] = env[var]
    redis_url = a.redis_url if a.redis_url is not None else env.get("REDIS_URL")
    if redis_url:
        ini["upload_progress.redis_url"] = redis_url
    storage = a.storage_dir or env.get("STORAGE_DIR")
    if storage:
        ini["upload_progress.storage_dir"] = os.path.abspath(storage)
    ini.update(_kv(a.ini))
    s = Stack(a.dir, ext, ini=ini, http_port=http_port, hub_port=hub_port, fpm=_kv(a.fpm) or None,
              redis=a.redis, scripts_dir=a.scripts_dir, docroot=a.docroot)
    s.detached = detached
    return s


def _state_path(d):
    return os.path.join(os.path.abspath(d), "stack.json")


def _load_state(d):
    try:
        with open(_state_path(d)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def selftest() -> int:
    """Prove the launcher without the extension: start, serve, route, reload, stop cleanly."""
    import tempfile
    import urllib.error
    import urllib.request

    results = []

    def check(name, fn):
        try:
            fn()
            results.append((name, None))
            print("ok   %s" % name, flush=True)
        except Exception as e:  # noqa: BLE001
            results.append((name, e))
            print("FAIL %s: %s" % (name, e), flush=True)

    def req(url, data=None, method=None, raw_path=None):
        if raw_path is not None:
            c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
            c.request(method or "GET", raw_path)
            r = c.getresponse()
            return r.status, r.read()
        try:
            r = urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=30)
            return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    with tempfile.TemporaryDirectory(prefix="stack-selftest-") as tmp:
        scripts = os.path.join(tmp, "scripts")
        os.makedirs(scripts)
        with open(os.path.join(scripts, "echo.php"), "w") as f:
            f.write('<?php header("Content-Type: application/json");'
                    '$n = 0; $in = fopen("php://input", "rb"); while (!feof($in)) { $n += strlen((string)fread($in, 65536)); }'
                    'echo json_encode(["len" => $n, "uri" => $_SERVER["REQUEST_URI"], "pid" => getmypid(),'
                    ' "mem" => ini_get("memory_limit")]);')
        s = Stack(os.path.join(tmp, "run"), None, ini={"memory_limit": "77M"}, scripts_dir=scripts,
                  fpm={"pm": "static", "pm.max_children": "2"})
        groups = {}

        def started():
            s.start()
            groups.update(s._pgids)
            assert s.http_port and s.hub_port and s.http_port != s.hub_port
            assert os.path.exists(s.fpm_socket)
            assert os.path.isdir(s.storage_dir)

        def body_streams():
            st, body = req(s.base_url + "/t/echo.php?x=1", data=os.urandom(3 * 1024 * 1024), method="PUT")
            j = json.loads(body)
            assert st == 200 and j["len"] == 3 * 1024 * 1024 and j["mem"] == "77M", (st, body[:200])

        def raw_api_routing():
            for path in ("/api/../index.html", "/api/uploads/..%2F..%2Fetc", "/api/%2e%2e/x"):
                st, body = req(None, raw_path=path)
                assert body.lstrip().startswith(b"{"), (path, st, body[:120])
            st, body = req(None, raw_path="/api/../../../etc/passwd")
            assert st == 400 and body.startswith(b"{"), (st, body[:120])

        def static_and_client():
            st, _ = req(s.base_url + "/")
            assert st in (200, 403, 404)
            st, body = req(s.base_url + "/client/upload-progress.js")
            assert st == 200 and b"export" in body, st

        def reload_keeps_master():
            pid = s.fpm_master_pid
            s.reload_fpm()
            assert s.fpm_master_pid == pid and _alive(pid)
            body_streams()

        def stops_clean():
            s.stop()
            s.stop()
            left = [p for g in groups.values() for p in _group_members(g)]
            assert not left, "left behind: %s" % left

        check("start", started)
        if results[-1][1] is None:
            check("request body streams to PHP", body_streams)
            check("raw /api URIs reach the front controller, malformed ones get JSON 400", raw_api_routing)
            check("static files and /client/", static_and_client)
            check("reload_fpm keeps the master pid and serves again", reload_keeps_master)
        check("stop leaves no process behind", stops_clean)
        if any(e for _, e in results):
            print(s.log_tail(30))
    failed = sum(1 for _, e in results if e)
    print("stack: %d passed, %d failed" % (len(results) - failed, failed))
    return 1 if failed else 0


def main(argv=None):
    argv = argv if argv is not None else sys.argv[1:]
    if argv[:1] == ["selftest"]:
        return selftest()
    a = _parse_args(argv)
    if a.cmd == "up":
        old = _load_state(a.dir)
        if old and (_alive(old.get("nginx_pid")) or _alive(old.get("fpm_master_pid"))):
            Stack.from_state(old).stop()
        s = _build_from_args(a, detached=True)
        s.start()
        s.hub_pids()
        with open(_state_path(a.dir), "w") as f:
            json.dump(s.state(), f, indent=2)
        print("up: %s (hub %s, dir %s)" % (s.base_url, s.hub_listen, s.run_dir), flush=True)
        return 0
    if a.cmd == "down":
        st = _load_state(a.dir)
        if not st:
            print("down: nothing recorded in %s" % _state_path(a.dir))
            return 0
        Stack.from_state(st).stop()
        try:
            os.unlink(_state_path(a.dir))
        except FileNotFoundError:
            pass
        print("down: stopped %s" % st.get("base_url"))
        return 0
    if a.cmd == "hub-pid":
        st = _load_state(a.dir)
        if not st:
            return 1
        pids = Stack.from_state(st).hub_pids()
        print(" ".join(map(str, pids)))
        return 0 if pids else 1
    if a.cmd == "status":
        st = _load_state(a.dir)
        if not st:
            print("not running")
            return 1
        st["alive"] = {"nginx": _alive(st.get("nginx_pid")), "fpm": _alive(st.get("fpm_master_pid"))}
        st["hub_pids"] = Stack.from_state(st).hub_pids()
        print(json.dumps(st, indent=2))
        return 0
    if a.cmd == "run":
        s = _build_from_args(a, detached=False)
        stop_evt = threading.Event()

        def on_sig(sig, frame):
            stop_evt.set()

        signal.signal(signal.SIGINT, on_sig)
        signal.signal(signal.SIGTERM, on_sig)
        s.start()
        with open(_state_path(a.dir), "w") as f:
            json.dump(s.state(), f, indent=2)
        print("running: %s (hub %s, dir %s) - Ctrl-C stops" % (s.base_url, s.hub_listen, s.run_dir), flush=True)
        try:
            while not stop_evt.wait(0.5):
                if not _alive(s.nginx_pid) or not _alive(s.fpm_master_pid):
                    print("a process died:\n" + s.log_tail(20), file=sys.stderr)
                    break
        finally:
            s.stop()
            try:
                os.unlink(_state_path(a.dir))
            except FileNotFoundError:
                pass
        print("stopped")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
