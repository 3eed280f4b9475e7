"""Issue #15: terminal events survive a hub that stops reading for a moment."""
import os
import signal
import time

from helpers import Pusher, data_of, get_json
from test_hub import hub_up


def test_complete_published_while_the_hub_is_stalled_reaches_the_subscriber(make_stack):
    """Attack/fault tried: the hub is SIGSTOPped for 200 ms while a worker publishes a
    burst of 300 progress events of 8 KB (far more than the socket buffer holds) and then
    `complete`. Before, every frame that found the socket full was dropped, `complete`
    too, and the browser never learned that the upload finished. Now the request is not
    held up, the progress events coalesce, and `complete` reaches the WebSocket
    subscriber once the hub runs again (at the worker's next chance: its next request)."""
    s = make_stack(fpm={"pm": "static", "pm.max_children": "1"})
    info = hub_up(s)
    c = Pusher(s)
    assert c.subscribe("stalled")["event"] == "pusher_internal:subscription_succeeded"
    os.kill(info["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, body = get_json(f"{s.base_url}/t/publish_burst.php?channel=stalled&n=300", timeout=10)
        took = time.monotonic() - t0
        assert status == 200, body
        assert body["complete"] is True and body["ok"] == 300, body
        assert body["dropped"] == 0, body
        assert body["coalesced"] > 0, body
        assert took < 2, f"the request waited for the stalled hub: {took:.2f} s"
        time.sleep(0.2)
    finally:
        os.kill(info["pid"], signal.SIGCONT)
    # The worker's next request flushes what it kept (RINIT), before anything new.
    get_json(f"{s.base_url}/t/status.php")
    msgs = c.events(lambda m: m.get("event") == "complete", timeout=5)
    assert data_of(msgs[-1]) == {"seq": 300}
    progress = [data_of(m)["seq"] for m in msgs if m.get("event") == "progress"]
    assert progress == sorted(progress) and progress[-1] == 300, "the latest progress wins"
    print(f"coalesced {body['coalesced']} of 300 progress events; publish loop {body['ms']:.1f} ms, request {took * 1000:.0f} ms (hub_status waits 250 ms for the stopped hub)")
    c.close()
