"""Markdown tables of bench/run.py results (also: python3 bench/report.py results.json)."""
from __future__ import annotations

import json
import sys


def _f(v, fmt="%.0f"):
    return "–" if v is None else fmt % v


def t_record(R):
    rows = R.get("record")
    if not rows:
        return ""
    redis = next((r for r in rows if r["method"] == "redis"), None)
    out = ["| way to record one progress update | median ns/call (p10–p90 of batch means) | vs publish() | calls | dropped |",
           "|---|---:|---:|---:|---:|"]
    pub = rows[0]["median_ns"]
    for r in rows:
        out.append("| %s | %s (%s–%s) | %s | %d | %d |" % (
            r["label"], _f(r["median_ns"]), _f(r["p10_ns"]), _f(r["p90_ns"]),
            "%.1f×" % (r["median_ns"] / pub), r["calls"], r["failed"]))
    s = "\n".join(out)
    hubrows = [r for r in rows if r.get("hub_us_per_msg") is not None]
    if hubrows:
        s += "\n\nHub CPU per message received: " + ", ".join("%.2f µs (%s)" % (r["hub_us_per_msg"], r["method"]) for r in hubrows) + "."
    if redis:
        s += "\n\nRedis round trip / publish(): **%.1f×** (goal ≥ 15×); publish() median %.0f ns (goal ≤ 1 000 ns). " % (
            redis["median_ns"] / pub, pub)
        s += "Each figure includes the PHP loop around the call (an empty loop body measures %.0f ns)." % rows[0]["loop_ns"]
    return s


def t_hook(R):
    h = R.get("hook")
    if not h:
        return ""
    mb = h["bytes"] / (1 << 20)
    return "\n".join([
        "| PUT of %.0f MiB to a read-and-discard script | MB/s (runs) | median MB/s |" % mb,
        "|---|---|---:|",
        "| extension loaded, `X-Progress-ID` set (progress events to the hub) | %s | %.0f |" % (
            ", ".join("%.0f" % x for x in h["with"]), h["median_with"]),
        "| extension not loaded | %s | %.0f |" % (", ".join("%.0f" % x for x in h["without"]), h["median_without"]),
        "", "Overhead of the body-progress hook: **%.2f %%** slower (goal < 2 %%; negative = faster)." % h["slower_pct"],
    ] + ([
        "", "CPU seconds per GiB of all server processes (nginx + php-fpm + hub), median: with %.2f, without %.2f (%+.1f %%). "
        "Mean per process: with %s; without %s." % (
            h["cpu_median_with"], h["cpu_median_without"],
            (h["cpu_median_with"] - h["cpu_median_without"]) / h["cpu_median_without"] * 100,
            ", ".join("%s %.2f" % kv for kv in sorted(h["cpu_breakdown"]["with"].items())),
            ", ".join("%s %.2f" % kv for kv in sorted(h["cpu_breakdown"]["without"].items())))
    ] if "cpu_median_with" in h else []))


def t_upload(R):
    u = R.get("upload")
    if not u:
        return ""
    out = ["| %.0f MiB in 8 MiB chunks, 4 parallel | MB/s | CPU-s per GiB (server processes) | bytes written per byte | runs (MB/s) |" % (u["bytes"] / (1 << 20)),
           "|---|---:|---:|---:|---|"]
    for r in u["rows"]:
        m = r["median"]
        out.append("| %s | %.0f | %.2f | %.2f | %s |" % (r["label"], m["mbps"], m["cpu_s_per_gib"], m["written_per_byte"],
                                                       ", ".join("%.0f" % x["mbps"] for x in r["runs"])))
    rows = u["rows"]
    out += ["", "CPU-s per GiB by process (median run): " + "; ".join(
        "%s: %s" % (r["label"].split(" (")[0].split(":")[0], ", ".join("%s %.2f" % kv for kv in sorted(r["median"].get("cpu_by_process", {}).items())))
        for r in rows)]
    if len(rows) >= 4:
        up, tus, plain = rows[0]["median"], rows[3]["median"], rows[2]["median"]
        out += ["", "Upload::writeChunk / @tus/server: **%.2f×** throughput (goal ≥ 1.5×, ≥ 650 MB/s), %.2f CPU-s/GiB (goal ≤ 1), "
                "%.2f bytes written per byte (goal 1.0); / plain PHP: %.2f× throughput." % (
                    up["mbps"] / tus["mbps"], up["cpu_s_per_gib"], up["written_per_byte"], up["mbps"] / plain["mbps"])]
    return "\n".join(out)


def t_fanout(R):
    f = R.get("fanout")
    if not f:
        return ""
    out = ["| subscribers | server | p50 ms | p99 ms | max ms | deliveries / expected | connect failures | server CPU ms / event | load client CPU ms / event |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for name, lab in (("hub", "hub (publish() → Unix socket → hub)"), ("node", "Node ws 8.23 (UDP side socket → broadcast)")):
        for r in f[name]:
            by.setdefault(r["requested"], []).append((lab, r))
    for n in sorted(by):
        for lab, r in by[n]:
            out.append("| %d | %s | %.2f | %.2f | %.2f | %d / %d | %d | %s | %s |" % (
                n, lab, r["p50_us"] / 1e3, r["p99_us"] / 1e3, r["max_us"] / 1e3, r["deliveries"], r["expected"],
                r["connect_failed"], _f(r.get("server_cpu_ms_per_event"), "%.1f"), _f(r.get("loadgen_cpu_ms_per_event"), "%.1f")))
    return "\n".join(out)


def t_memory(R):
    f = R.get("fanout")
    if not f:
        return ""
    out = ["| server | connections | VmRSS before | VmRSS with them open (idle, subscribed) | per connection |",
           "|---|---:|---:|---:|---:|"]
    for name, lab in (("hub", "hub"), ("node", "Node ws 8.23")):
        if f[name]:
            r = max(f[name], key=lambda x: x["requested"])
            out.append("| %s | %d | %d KiB | %d KiB | **%.2f KiB** |" % (lab, r["connections"], r["rss_before_kib"],
                                                                       r["rss_after_kib"], r["rss_per_conn_bytes"] / 1024))
    return "\n".join(out)


def t_storm(R):
    s = R.get("storm")
    if not s:
        return ""
    return "\n".join([
        "| reconnect storm (%d clients, hub killed with SIGKILL, restarted) | ms after the kill |" % s["connections"],
        "|---|---:|",
        "| new hub listening | %s |" % _f(s["hub_up_ms"], "%.0f"),
        "| latest event published to the new hub | %s |" % _f(s["published_ms"], "%.0f"),
        "| all clients reconnected (%d/%d) | %s |" % (s["reconnected"], s["connections"], _f(s["all_reconnected_ms"])),
        "| all resubscribed (%d/%d) | %s |" % (s["resubscribed"], s["connections"], _f(s["all_resubscribed_ms"])),
        "| all received the latest event (%d/%d): p50 / p99 / last | %s / %s / **%s** |" % (
            s["got_latest"], s["connections"], _f(s["got_latest_p50_ms"]), _f(s["got_latest_p99_ms"]), _f(s["all_got_latest_ms"])),
        "| connection attempts / refused or failed | %d / %d |" % (s["attempts"], s["failures"]),
    ])


SECTIONS = [("1. Recording one progress update", t_record), ("2. Body-progress hook overhead", t_hook),
            ("3. Chunked upload throughput", t_upload), ("4. Hub fan-out latency", t_fanout),
            ("5. Memory per idle WebSocket connection", t_memory), ("6. Reconnect storm", t_storm)]


def tables(R):
    parts = []
    for title, fn in SECTIONS:
        t = fn(R)
        if t:
            parts.append("### %s\n\n%s\n" % (title, t))
    return "\n".join(parts)


def render(R, notes=""):
    m = R["machine"]
    head = f"""# Benchmarks

Generated by `make bench` (bench/run.py, scale `{R['scale']}`) on {m['date']}; the run took {R['elapsed_s']:.0f} s.

Machine: {m['nproc']} cores, {m['cpu']} (SHA-NI: {'yes' if m['sha_ni'] else 'no'}), {m['mem_gib']} GiB RAM, Linux {m['kernel']},
load average at the start {' '.join(m['loadavg'])} (a shared machine: other jobs may run beside the benchmark).

Versions: {m['php']}; {m['nginx']}; node {m['node']} (ws {m['ws']}, {m['tus']}); {m['redis']};
upload_progress {m['extension']} (git {m['git']}, {m['rustc']}).

To reproduce: `make bench` (builds the extension and `bench/loadgen`, installs php8.2-redis,
php8.2-apcu and redis-server, runs `npm ci` in `bench/node`, then `tools/bench.sh` →
`python3 bench/run.py --scale full --out docs/benchmarks.md`; 4–8 minutes).
`BENCH_SCALE=small make bench` is a one-minute check (64 MiB, 100 connections) that does not
touch this file; `BENCH_ONLY=record,hook,upload,fanout,storm` selects benchmarks. Raw
results: `build/bench/results-<scale>.json`. The nginx + php-fpm stacks are started by
`tools/stack.py` (`Stack(run_dir, ext_path or None, scripts_dir="bench/php")`, 4 static
workers, `/t/<script>` served from bench/php); every other command is listed at the end.

"""
    cmds = "\n".join(R.get("commands", []))
    return head + tables(R) + "\n" + notes + "\n## Commands of this run\n\n```\n" + cmds + "\n```\n"



def goals(R):
    """(goal, measured, met) rows against TARGETS.md."""
    g = []
    rec = R.get("record") or []
    if rec:
        pub = rec[0]["median_ns"]
        redis = next((r for r in rec if r["method"] == "redis"), None)
        g.append(("publish() ≤ 1 µs median", "%.2f µs" % (pub / 1e3), pub <= 1000))
        if redis:
            g.append(("publish() ≥ 15× cheaper than phpredis hSet+publish", "%.1f×" % (redis["median_ns"] / pub),
                      redis["median_ns"] / pub >= 15))
    h = R.get("hook")
    if h:
        g.append(("body-progress hook < 2 % slower (1 GiB PUT)", "%.2f %%" % h["slower_pct"], h["slower_pct"] < 2))
    u = R.get("upload")
    if u and len(u["rows"]) >= 4:
        up, tus = u["rows"][0]["median"], u["rows"][3]["median"]
        g.append(("upload ≥ 650 MB/s and ≥ 1.5× @tus/server", "%.0f MB/s, %.2f×" % (up["mbps"], up["mbps"] / tus["mbps"]),
                  up["mbps"] >= 650 and up["mbps"] / tus["mbps"] >= 1.5))
        g.append(("upload ≤ 1 CPU-s per GiB", "%.2f CPU-s" % up["cpu_s_per_gib"], up["cpu_s_per_gib"] <= 1))
        g.append(("upload 1.0 byte written per byte", "%.2f" % up["written_per_byte"], up["written_per_byte"] <= 1.05))
    f = R.get("fanout")
    if f and f["hub"]:
        big = max(f["hub"], key=lambda x: x["requested"])
        one = min(f["hub"], key=lambda x: x["requested"])
        g.append(("idle connection ≤ 4 KiB RSS", "%.2f KiB" % (big["rss_per_conn_bytes"] / 1024),
                  big["rss_per_conn_bytes"] <= 4096))
        g.append(("one event to %d subscribers: p99 ≤ 60 ms" % big["requested"], "%.1f ms" % (big["p99_us"] / 1e3),
                  big["p99_us"] <= 60_000))
        if one["requested"] == 1:
            g.append(("publish() → 1 subscriber p50 ≤ 1 ms", "%.2f ms" % (one["p50_us"] / 1e3), one["p50_us"] <= 1000))
        g.append(("%d connections held, 0 lost" % big["requested"],
                  "%d connected, %d/%d deliveries" % (big["connections"], big["deliveries"], big["expected"]),
                  big["connect_failed"] == 0 and big["deliveries"] == big["expected"]))
    return g


def t_goals(R):
    rows = goals(R)
    if not rows:
        return ""
    out = ["| goal (TARGETS.md) | measured | met? |", "|---|---:|---|"]
    for name, val, ok in rows:
        out.append("| %s | %s | %s |" % (name, val, "yes" if ok else "**no**"))
    return "\n".join(out)


SECTIONS.insert(0, ("Goals at a glance", t_goals))


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
