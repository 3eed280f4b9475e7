"""The hub's Pusher HTTP API against the official Pusher server SDK for Node
(`pusher` on npm) and pusher-js clients (tests/integration/pusher_sdk/sdk.mjs):
trigger, triggerBatch, multi-channel trigger, socket_id exclusion, a wrong
secret (401), an event over 10 KB (413), SDK-signed private and presence
auth, the channel queries and terminate_connections; on one host, and on two
hosts sharing Redis (the SDK asks host A, a client is on host B: every answer
must cover both hosts).

Before: the channel queries were 405 (only POST was served under /apps/), and
identical GET queries signed within the same second would have been refused
as replays."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_hub import hub_up
from test_redis import redis_servers, start_cluster, wait_metric  # noqa: F401 (fixture)

SDK_DIR = Path(__file__).resolve().parent / "pusher_sdk"
NODE = shutil.which("node")
APP = {"upload_progress.app_id": "4242", "upload_progress.app_key": "sdk-key",
       "upload_progress.app_secret": "sdk-secret"}
CHECKS = ["trigger", "triggerBatch", "multi-channel trigger", "socket_id exclusion",
          "wrong secret is 401", "event over 10 KB is 413", "SDK-signed private auth",
          "SDK-signed presence auth", "GET /channels (filter_by_prefix, info=user_count)",
          "GET /channels/{name} (info=subscription_count,user_count)", "GET /channels/{name}/users",
          "identical GET queries are not refused as replays", "terminate_connections"]

pytestmark = pytest.mark.skipif(
    NODE is None or not (SDK_DIR / "node_modules" / "pusher").is_dir(),
    reason="node or tests/integration/pusher_sdk/node_modules missing (tools/deps.sh test)")


def run_sdk(ports, stacks):
    cfg = {"app_id": APP["upload_progress.app_id"], "key": APP["upload_progress.app_key"],
           "secret": APP["upload_progress.app_secret"], "ports": ports}
    r = subprocess.run([NODE, str(SDK_DIR / "sdk.mjs"), json.dumps(cfg)], cwd=SDK_DIR,
                       capture_output=True, text=True, timeout=120)
    done = [line[3:] for line in r.stdout.splitlines() if line.startswith("ok ")]
    logs = "\n".join(s.log_tail(40) for s in stacks)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{logs}"
    assert done == CHECKS, done


def test_pusher_sdk_one_host(make_stack):
    s = make_stack(ini=dict(APP))
    hub_up(s)
    run_sdk([s.hub_port], [s])


def two_hosts(make_stack, tmp_path, redis_url):
    shared = tmp_path / "shared-storage"
    shared.mkdir(mode=0o700)  # the storage root must be ours and closed to others
    ini = dict(APP, **{"upload_progress.redis_url": redis_url,
                       "upload_progress.storage_dir": str(shared)})
    a = make_stack(ini=ini, suffix="-a")
    b = make_stack(ini=ini, suffix="-b")
    for s in (a, b):
        hub_up(s)
        wait_metric(s, "redis_connected", 1)
    return a, b


HAS_REDIS = os.path.exists(shutil.which("redis-server") or "/usr/bin/redis-server")


@pytest.mark.skipif(not HAS_REDIS, reason="redis-server not installed")
def test_pusher_sdk_two_hosts_sharing_redis(make_stack, tmp_path, redis_servers):  # noqa: F811
    (redis,) = redis_servers(1)
    a, b = two_hosts(make_stack, tmp_path, redis.url)
    run_sdk([a.hub_port, b.hub_port], [a, b])


@pytest.mark.skipif(not HAS_REDIS, reason="redis-server not installed")
def test_pusher_sdk_two_hosts_redis_cluster(make_stack, tmp_path, redis_servers):  # noqa: F811
    """The same on a 3-master Redis Cluster: occupancy keys on several slots,
    the control channel sharded (SSUBSCRIBE/SPUBLISH)."""
    nodes = start_cluster(redis_servers)
    a, b = two_hosts(make_stack, tmp_path, f"{nodes[0].url}?cluster=1")
    run_sdk([a.hub_port, b.hub_port], [a, b])
