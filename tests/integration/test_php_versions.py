"""The extension against the PHP version of the test leg (PHP_VERSION: 8.2 on the host,
8.4 in the Debian 13 root of tools/php-root.sh), and the load-time refusals: a build
for another PHP API, a thread-safe (ZTS) PHP."""
import os
import shutil
import subprocess

import pytest

from conftest import EXT

VERSION = os.environ.get("PHP_VERSION") or "8.2"
PHP = shutil.which(f"php{VERSION}") or f"/usr/bin/php{VERSION}"


def php(*args, env=None, ext=EXT):
    return subprocess.run([PHP, "-n", "-d", f"extension={ext}", *args],
                          capture_output=True, text=True, timeout=30, env=env)


def test_cli_loads_the_build_of_this_php_version():
    r = php("-r", 'echo PHP_MAJOR_VERSION, ".", PHP_MINOR_VERSION, " ", '
                  'extension_loaded("upload_progress") ? "loaded" : "missing", " ", '
                  '(new ReflectionExtension("upload_progress"))->getVersion();')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == [VERSION, "loaded"], r.stdout + r.stderr
    assert "Warning" not in r.stdout + r.stderr


def test_fpm_of_this_version_serves_with_the_extension(make_stack):
    s = make_stack()
    exe = os.path.realpath(f"/proc/{s.fpm_master_pid}/exe")
    assert os.path.basename(exe) == f"php-fpm{VERSION}", exe
    log = open(os.path.join(s.run_dir, "fpm.log")).read()
    assert "upload_progress" not in log and "Unable" not in log, log


def test_build_for_another_php_api_is_refused_with_phps_message():
    """Attacker/accident: the .so built for the other PHP version (8.2 <-> 8.4) is put in
    this PHP's extension dir. PHP must refuse it with its own API-mismatch message and
    keep running, never call into it."""
    other = os.environ.get("UPLOAD_PROGRESS_OTHER_EXT")
    if not other or not os.path.exists(other):
        pytest.skip("no build for another PHP version here (the 8.4 leg gets the 8.2 one)")
    r = php("-r", 'echo extension_loaded("upload_progress") ? "loaded" : "refused";', ext=other)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Module compiled with module API=" in out and "These options need to match" in out, out
    assert out.rstrip().endswith("refused"), out


def test_zts_php_is_refused_at_load(tmp_path):
    """Tried: make the running PHP look thread-safe by preloading a library that exports
    tsrm_get_ls_cache (a symbol only ZTS builds of PHP have). The module must refuse to
    start with a message naming ZTS, and no script may run with it half set up."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler")
    src = tmp_path / "zts.c"
    src.write_text("void *tsrm_get_ls_cache(void) { return 0; }\n")
    shim = tmp_path / "libzts.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(src)], check=True)
    env = dict(os.environ, LD_PRELOAD=str(shim))
    r = php("-r", 'echo "script ran";', env=env)
    out = r.stdout + r.stderr
    assert "thread-safe (ZTS) builds of PHP are not supported yet" in out, out
    assert "Unable to start upload_progress module" in out, out
    assert "script ran" not in out and r.returncode != 0, out
    # The same PHP without the shim loads it: the refusal comes from the ZTS check.
    assert php("-r", 'echo "script ran";').stdout == "script ran"
