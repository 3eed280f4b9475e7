"""The Debian package of the extension, installed in a Debian root of its PHP version
(tools/deb-test.sh runs this there, in a private network namespace): `apt-get install
./php<X.Y>-upload-progress_<version>_amd64.deb`, the stock php-fpm and the nginx site of
docs/deployment.md, one chunked upload watched by a WebSocket client, then `apt-get
remove` / `purge` leave nothing enabled.

Environment: DEB (the package), PHP_VERSION (X.Y). Runs as root; changes the root's
system files, so it refuses to run outside a root made by tools/php-root.sh."""
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from helpers import Pusher, data_of, http  # noqa: E402

DEB = os.environ.get("DEB", "")
VER = os.environ.get("PHP_VERSION", "")
PKG = f"php{VER}-upload-progress"
PORT = 8080
MiB = 1 << 20
STORAGE = "/var/lib/upload-progress"

pytestmark = pytest.mark.skipif(
    not (DEB and VER and os.path.exists("/.upload-progress-root") and os.geteuid() == 0),
    reason="runs inside a root of tools/php-root.sh, through tools/deb-test.sh")


def sh(*argv, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def enabled_links():
    return sorted(glob.glob(f"/etc/php/{VER}/*/conf.d/*upload_progress*"))


def php_modules():
    return sh(f"php{VER}", "-m").stdout.split()


def site_from_docs():
    """The nginx site of docs/deployment.md, with plain HTTP on PORT instead of TLS and
    the demo's front controller as /srv/app/api.php."""
    doc = (REPO / "docs" / "deployment.md").read_text()
    conf = re.search(r"```nginx\n(.*?)```", doc, re.S).group(1)
    assert "listen 443 ssl;" in conf and "php8.2-fpm.sock" in conf
    return (conf.replace("listen 443 ssl;", f"listen {PORT};")
                .replace("php8.2-fpm.sock", f"php{VER}-fpm.sock"))


class Site:
    """Stock php-fpm (Debian's config, pool www as www-data) + nginx with the site."""

    def __init__(self):
        Path("/srv/app").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "php" / "demo" / "api.php", "/srv/app/api.php")
        Path("/etc/nginx/sites-available/upload-progress").write_text(site_from_docs())
        link = Path("/etc/nginx/sites-enabled/upload-progress")
        if not link.exists():
            link.symlink_to("/etc/nginx/sites-available/upload-progress")
        Path("/run/php").mkdir(parents=True, exist_ok=True)
        sh(f"php-fpm{VER}", "--test")
        sh("nginx", "-t")
        sh(f"php-fpm{VER}", "--daemonize")
        sh("nginx")
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                status, _ = http("GET", f"http://127.0.0.1:{PORT}/api/config", headers=self.host, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the site did not answer:\n" + self.logs())

    host = {"Host": "example.com"}

    def api(self, method, path, body=None, headers=None):
        h = dict(self.host, **(headers or {}))
        status, raw = http(method, f"http://127.0.0.1:{PORT}{path}", body, h, timeout=60)
        return status, json.loads(raw) if raw else None

    def logs(self):
        out = []
        for p in [f"/var/log/php{VER}-fpm.log", "/var/log/nginx/error.log", *glob.glob(f"{STORAGE}/hub-*.log")]:
            try:
                out.append(f"==> {p}\n" + Path(p).read_text()[-3000:])
            except OSError:
                pass
        return "\n".join(out)

    def stop(self):
        subprocess.run(["nginx", "-s", "stop"], capture_output=True)
        for pidfile in [f"/run/php/php{VER}-fpm.pid", *glob.glob(f"{STORAGE}/hub-*.pid")]:
            try:
                os.kill(int(Path(pidfile).read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        Path("/etc/nginx/sites-enabled/upload-progress").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def installed():
    # Maintainer scripts must not start services in the root (the standard chroot guard).
    # What an interrupted earlier run may have left in this (test-only) root.
    subprocess.run(["dpkg", "--purge", PKG], capture_output=True)
    shutil.rmtree(STORAGE, ignore_errors=True)
    for f in glob.glob(f"/var/lib/php/modules/{VER}/*/*/upload_progress"):
        os.unlink(f)
    policy = Path("/usr/sbin/policy-rc.d")
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        sh("apt-get", "install", "-y", "-q", "--no-install-recommends", os.path.abspath(DEB),
           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        yield
    finally:
        subprocess.run(["apt-get", "purge", "-y", "-q", PKG], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        policy.unlink(missing_ok=True)


def test_install_lays_out_like_debian_php_extensions(installed):
    api = sh(f"php{VER}", "-n", "-r", "echo PHP_EXTENSION_DIR;").stdout.strip()
    assert os.path.isfile(f"{api}/upload_progress.so")
    ini = Path(f"/etc/php/{VER}/mods-available/upload_progress.ini").read_text()
    assert "extension=upload_progress.so" in ini and "; priority=20" in ini
    assert ";upload_progress.listen = 127.0.0.1:6001" in ini, "directives are there, commented"
    links = enabled_links()
    assert f"/etc/php/{VER}/cli/conf.d/20-upload_progress.ini" in links
    assert f"/etc/php/{VER}/fpm/conf.d/20-upload_progress.ini" in links
    assert "upload_progress" in php_modules()
    st = os.stat(STORAGE)
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, int(sh("id", "-u", "www-data").stdout))
    control = sh("dpkg-query", "-W", "-f=${Depends}", PKG).stdout
    api_no = os.path.basename(api)
    assert f"phpapi-{api_no}" in control
    # Read from the package: the root's dpkg.cfg drops most of /usr/share/doc.
    files = sh("dpkg-deb", "-c", DEB).stdout
    for f in ("copyright", "changelog.Debian.gz"):
        assert f"./usr/share/doc/{PKG}/{f}" in files, files
    secret = os.stat(f"{STORAGE}/.app-secret")
    assert (secret.st_mode & 0o777, secret.st_uid) == (0o600, st.st_uid), "the pool can read the secret"


def test_chunked_upload_through_the_documented_site(installed, tmp_path):
    site = Site()
    try:
        data = os.urandom(3 * MiB + 12345)
        digest = hashlib.sha256(data).hexdigest()
        status, up = site.api("POST", "/api/uploads",
                              json.dumps({"size": len(data), "name": "a.bin", "chunk_size": MiB,
                                          "sha256": digest}).encode(),
                              {"Content-Type": "application/json"})
        assert status == 201, (up, site.logs())
        uid, channel = up["id"], up["channel"]

        class ViaNginx:  # the WebSocket goes through the site's /app/ proxy
            hub_port = PORT
        c = Pusher(ViaNginx, timeout=15)
        status, auth = site.api("POST", "/api/broadcasting/auth",
                                f"socket_id={c.socket_id}&channel_name={channel}".encode(),
                                {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200, auth
        ok = c.subscribe(channel, auth=auth["auth"])
        assert ok["event"] == "pusher_internal:subscription_succeeded", ok
        for i in range(up["chunk_count"]):
            part = data[i * MiB:(i + 1) * MiB]
            status, body = site.api("PUT", f"/api/uploads/{uid}/chunks/{i}", part,
                                    {"Content-Type": "application/octet-stream"})
            assert status == 200, body
        status, done = site.api("POST", f"/api/uploads/{uid}/complete")
        assert status == 200, done
        assert "path" not in done, "no server path in JSON sent to browsers"
        stored = Path(STORAGE) / uid / "data"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
        msgs = c.events(lambda m: m.get("event") == "complete", timeout=20)
        progress = [data_of(m) for m in msgs if m.get("event") == "progress"]
        assert progress and progress[-1]["bytes_done"] <= len(data)
        assert data_of(msgs[-1])["state"] == "complete" and "path" not in data_of(msgs[-1])
        c.close()
    finally:
        site.stop()


def test_remove_and_purge_leave_nothing_enabled(installed):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh("apt-get", "remove", "-y", "-q", PKG, env=env)
    assert enabled_links() == []
    assert "upload_progress" not in php_modules()
    sh("apt-get", "purge", "-y", "-q", PKG, env=env)
    assert not os.path.exists(f"/etc/php/{VER}/mods-available/upload_progress.ini")
    assert glob.glob(f"/var/lib/php/modules/{VER}/*/*/upload_progress") == []
    assert not os.path.exists(f"{STORAGE}/.app-secret")
    assert sh("dpkg-query", "-W", "-f=${Status}", PKG, check=False).stdout in ("", "unknown ok not-installed")
