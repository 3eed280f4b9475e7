"""The demo teaches safe habits (shared-host hardening, items 13 and 14): an upload
belongs to the browser session that created it, no server path reaches a browser, and a
chunk for an upload that is no longer uploading is a conflict (409).

The attacker here is another browser (another session cookie, or none) that knows or
guesses an upload id: it tries to read, write, complete, delete and watch the upload."""
import hashlib
import json
import secrets
import urllib.request

from helpers import OWNER_COOKIE, Pusher, data_of, http as request
from test_hub import hub_up

KiB = 1024


def as_session(cookie):
    return {"Cookie": cookie} if cookie else {"Cookie": ""}


def create(s, size, chunk_size, cookie=OWNER_COOKIE):
    status, resp = request("POST", f"{s.base_url}/api/uploads",
                           json.dumps({"size": size, "name": "f.bin", "chunk_size": chunk_size}).encode(),
                           {"Content-Type": "application/json", "Cookie": cookie})
    assert status == 201, resp
    return json.loads(resp)


def auth(s, socket_id, channel, cookie=OWNER_COOKIE):
    return request("POST", f"{s.base_url}/api/broadcasting/auth",
                   f"socket_id={socket_id}&channel_name={channel}".encode(),
                   {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})


def test_uploads_belong_to_the_session_that_created_them(make_stack):
    s = make_stack()
    up = create(s, 2 * 64 * KiB, 64 * KiB)
    uid = up["id"]
    base = f"{s.base_url}/api/uploads/{uid}"
    assert request("PUT", f"{base}/chunks/0", b"a" * 64 * KiB)[0] == 200

    strangers = {
        "another session": f"upload_owner={secrets.token_hex(16)}",
        "no cookie": "",
        "a malformed cookie": "upload_owner=../../etc",
        "the owner hash as cookie": "upload_owner=" + hashlib.sha256(OWNER_COOKIE.split("=")[1].encode()).hexdigest(),
    }
    for who, cookie in strangers.items():
        h = as_session(cookie)
        assert request("GET", base, headers=h)[0] == 404, who
        status, body = request("PUT", f"{base}/chunks/1", b"X" * 64 * KiB, h)
        assert status == 404, (who, status, body)
        assert request("POST", f"{base}/complete", headers=h)[0] == 404, who
        assert request("DELETE", base, headers=h)[0] == 404, who
        status, body = auth(s, "1.2", f"private-upload.{uid}", cookie)
        assert status == 403, (who, status, body)

    # nothing the strangers did changed the upload
    status, body = request("GET", base)
    st = json.loads(body)
    assert status == 200 and st["chunks_done"] == 1 and st["missing"] == [1], st
    assert "owner" not in st["metadata"], "the owner hash stays on the server"
    # the owner may watch it, and only its own uploads
    status, body = auth(s, "1.2", f"private-upload.{uid}")
    assert status == 200 and json.loads(body)["auth"].count(":") == 1, body
    other = create(s, 10, 10, cookie=strangers["another session"])
    assert auth(s, "1.2", f"private-upload.{other['id']}")[0] == 403
    assert auth(s, "1.2", "private-upload.notanuploadid")[0] == 403


def test_first_request_gets_an_httponly_session_cookie(make_stack):
    s = make_stack()
    req = urllib.request.Request(f"{s.base_url}/api/uploads", method="POST",
                                 data=json.dumps({"size": 5, "name": "x"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        cookie = r.headers.get("Set-Cookie", "")
        uid = json.loads(r.read())["id"]
    assert cookie.startswith("upload_owner=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    token = cookie.split(";")[0]
    assert request("GET", f"{s.base_url}/api/uploads/{uid}", headers={"Cookie": token})[0] == 200
    assert request("GET", f"{s.base_url}/api/uploads/{uid}")[0] == 404


def test_no_server_path_goes_to_browsers(make_stack):
    s = make_stack()
    hub_up(s)
    up = create(s, 3000, 3000)
    uid, channel = up["id"], up["channel"]
    c = Pusher(s)
    status, body = auth(s, c.socket_id, channel)
    assert status == 200, body
    assert c.subscribe(channel, auth=json.loads(body)["auth"])["event"] == "pusher_internal:subscription_succeeded"
    assert request("PUT", f"{s.base_url}/api/uploads/{uid}/chunks/0", b"p" * 3000)[0] == 200
    status, body = request("POST", f"{s.base_url}/api/uploads/{uid}/complete")
    assert status == 200 and json.loads(body)["state"] == "complete", body
    assert "path" not in json.loads(body) and s.storage_dir.encode() not in body
    status, body = request("GET", f"{s.base_url}/api/uploads/{uid}")
    assert status == 200 and "path" not in json.loads(body) and s.storage_dir.encode() not in body
    msgs = c.events(lambda m: m.get("event") == "complete", timeout=15)
    done = data_of(msgs[-1])
    assert done["state"] == "complete" and "path" not in done, done
    assert s.storage_dir not in json.dumps(msgs)
    c.close()


def test_chunk_for_a_complete_upload_is_a_conflict(make_stack):
    """Tried: after complete(), re-send chunk 0 with a body of the wrong length and with a
    wrong checksum (both were answered 200 before)."""
    s = make_stack()
    up = create(s, 4096, 4096)
    uid = up["id"]
    data = b"c" * 4096
    assert request("PUT", f"{s.base_url}/api/uploads/{uid}/chunks/0", data)[0] == 200
    assert request("POST", f"{s.base_url}/api/uploads/{uid}/complete")[0] == 200
    for body, headers in [(b"short", {}), (data, {"X-Chunk-Checksum": "sha256:" + "0" * 64}), (data, {})]:
        status, resp = request("PUT", f"{s.base_url}/api/uploads/{uid}/chunks/0", body, headers)
        assert status == 409, (status, resp)
        assert json.loads(resp)["error"]
    status, st = request("GET", f"{s.base_url}/api/uploads/{uid}")
    assert json.loads(st)["state"] == "complete"
    with open(f"{s.storage_dir}/{uid}/data", "rb") as f:
        assert f.read() == data, "the stored file is untouched"
