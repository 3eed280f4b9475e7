// Unit tests of php/client/upload-progress.js in node (no browser, no extension):
// SHA-256, backoff, the Pusher socket state machine against a fake WebSocket, and
// ChunkedUpload against an in-memory fake of the demo's REST API.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import {
  sha256HexSync, sha256Hex, backoffDelay, PusherSocket, SocketState, ChunkedUpload, UploadState,
} from '../../php/client/upload-progress.js';

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

test('sha256: pure-JS fallback and WebCrypto agree with node:crypto', async () => {
  for (const n of [0, 1, 55, 56, 63, 64, 65, 1000, 70000]) {
    const b = crypto.randomBytes(n);
    const want = crypto.createHash('sha256').update(b).digest('hex');
    assert.equal(sha256HexSync(b), want, `pure JS, ${n} bytes`);
    assert.equal(await sha256Hex(new Blob([b])), want, `WebCrypto, ${n} bytes`);
  }
});

test('backoff: full jitter below an exponential, capped ceiling', () => {
  assert.equal(backoffDelay(0, { random: () => 0 }), 0);
  assert.equal(backoffDelay(0, { random: () => 0.999999 }), 499);
  assert.equal(backoffDelay(3, { random: () => 0.999999 }), 3999);
  assert.equal(backoffDelay(40, { random: () => 0.999999, maxMs: 30000 }), 29999);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(5);
    assert.ok(d >= 0 && d < 16000);
  }
});

// ---- fake WebSocket + hub --------------------------------------------------------------
class FakeHub {
  constructor() { this.sockets = []; this.refuse = false; this.latest = new Map(); }
  get last() { return this.sockets[this.sockets.length - 1]; }
}

function fakeWebSocketClass(hub) {
  return class FakeWS {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      hub.sockets.push(this);
      setTimeout(() => {
        if (hub.refuse) { this.readyState = 3; this.onclose?.({ code: 1006, reason: '' }); return; }
        this.readyState = 1;
        this.socketId = `${hub.sockets.length}.${hub.sockets.length * 7}`;
        this.serverSend({ event: 'pusher:connection_established', data: JSON.stringify({ socket_id: this.socketId, activity_timeout: 30 }) });
      }, 1);
    }
    send(text) {
      const msg = JSON.parse(text);
      this.sent.push(msg);
      if (msg.event === 'pusher:subscribe') {
        this.serverSend({ event: 'pusher_internal:subscription_succeeded', channel: msg.data.channel, data: '{}' });
        const l = hub.latest.get(msg.data.channel);
        if (l) this.serverSend(l);
      }
      if (msg.event === 'pusher:ping') this.serverSend({ event: 'pusher:pong', data: '{}' });
    }
    serverSend(obj) { if (this.readyState === 1) this.onmessage?.({ data: JSON.stringify(obj) }); }
    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    close() {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code: 1005, reason: '' }), 1);
    }
  };
}

function fakeAuthFetch(calls) {
  return async (url, init) => {
    const p = new URLSearchParams(init.body);
    calls.push({ url, socket_id: p.get('socket_id'), channel: p.get('channel_name') });
    return new Response(JSON.stringify({ auth: `key:${p.get('socket_id')}` }), { status: 200, headers: { 'content-type': 'application/json' } });
  };
}

test('socket: connects, authorises private channels, drops stale seq, answers pings', async () => {
  const hub = new FakeHub();
  const auths = [];
  const s = new PusherSocket({ key: 'k', wsHost: '127.0.0.1', wsPort: 1, WebSocket: fakeWebSocketClass(hub), fetch: fakeAuthFetch(auths) });
  const states = [];
  s.addEventListener('statechange', (e) => states.push(e.detail.current));
  const ch = s.subscribe('private-upload.aaaaaaaaaaaaaaaaaaaaaaaaaa');
  const got = [];
  ch.bind('progress', (d) => got.push(d.seq));
  s.connect();
  assert.match(hub.last.url, /^ws:\/\/127\.0\.0\.1:1\/app\/k\?protocol=7&/);
  await tick(20);
  assert.equal(s.state, SocketState.CONNECTED);
  assert.deepEqual(states, ['connecting', 'connected']);
  assert.equal(auths.length, 1);
  assert.equal(auths[0].socket_id, hub.last.socketId);
  const sub = hub.last.sent.find((m) => m.event === 'pusher:subscribe');
  assert.equal(sub.data.auth, `key:${hub.last.socketId}`);
  assert.ok(ch.subscribed);
  for (const seq of [1, 2, 2, 1, 5, 4, 6]) {
    hub.last.serverSend({ event: 'progress', channel: ch.name, data: JSON.stringify({ seq, bytes_done: seq }) });
  }
  assert.deepEqual(got, [1, 2, 5, 6]);
  assert.equal(ch.staleDropped, 3);
  hub.last.serverSend({ event: 'pusher:ping', data: '{}' });
  assert.equal(hub.last.sent.at(-1).event, 'pusher:pong');
  s.disconnect();
  assert.equal(s.state, SocketState.DISCONNECTED);
});

test('socket: reconnects with backoff after a drop and resubscribes with a fresh auth', async () => {
  const hub = new FakeHub();
  const auths = [];
  const s = new PusherSocket({ key: 'k', wsHost: 'h', wsPort: 1, WebSocket: fakeWebSocketClass(hub), fetch: fakeAuthFetch(auths), reconnectBaseMs: 20, reconnectMaxMs: 40 });
  const ch = s.subscribe('private-upload.bbbbbbbbbbbbbbbbbbbbbbbbbb');
  s.connect();
  await tick(20);
  const first = hub.last;
  hub.refuse = true;
  first.serverClose(1006);
  assert.equal(s.state, SocketState.RECONNECTING);
  assert.equal(ch.subscribed, false);
  await tick(150); // a few refused attempts
  assert.ok(hub.sockets.length >= 2);
  assert.equal(s.state, SocketState.RECONNECTING);
  hub.refuse = false;
  await waitUntil(() => s.state === SocketState.CONNECTED && ch.subscribed, 2000);
  assert.notEqual(hub.last, first);
  assert.equal(auths.at(-1).socket_id, hub.last.socketId, 'auth signed for the new socket id');
  assert.equal(s.attempt, 0, 'attempts reset once connected');
  s.disconnect();
});

test('socket: close code 4200 reconnects at once (small jitter), 4001 does not reconnect', async () => {
  const hub = new FakeHub();
  const s = new PusherSocket({ key: 'k', wsHost: 'h', wsPort: 1, WebSocket: fakeWebSocketClass(hub), fetch: fakeAuthFetch([]), reconnectBaseMs: 5000, reconnectMaxMs: 60000, random: () => 0.5 });
  s.connect();
  await tick(20);
  const t0 = Date.now();
  hub.last.serverClose(4200, 'restart');
  await waitUntil(() => s.state === SocketState.CONNECTED, 3000);
  assert.ok(Date.now() - t0 < 2000, 'reconnected within the small jitter (500 ms here), not after the backoff (2.5 s here)');
  const errors = [];
  s.addEventListener('error', (e) => errors.push(e.detail));
  hub.last.serverClose(4001, 'unknown app');
  await tick(50);
  assert.equal(s.state, SocketState.DISCONNECTED);
  assert.equal(errors[0].code, 4001);
  const n = hub.sockets.length;
  await tick(100);
  assert.equal(hub.sockets.length, n, 'no reconnect after 4001');
});

test('socket: pong timeout drops a silent connection and reconnects', async () => {
  const hub = new FakeHub();
  const WS = fakeWebSocketClass(hub);
  class SilentWS extends WS { send(text) { this.sent.push(JSON.parse(text)); } }
  const s = new PusherSocket({ key: 'k', wsHost: 'h', wsPort: 1, WebSocket: SilentWS, activityTimeoutMs: 30, pongTimeoutMs: 30, reconnectBaseMs: 10, reconnectMaxMs: 20 });
  s.connect();
  await tick(10);
  assert.equal(s.state, SocketState.CONNECTED);
  const first = hub.last;
  await waitUntil(() => hub.sockets.length >= 2, 2000);
  assert.ok(first.sent.some((m) => m.event === 'pusher:ping'), 'sent a ping after the activity timeout');
  s.disconnect();
});

async function waitUntil(fn, ms) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (fn()) return;
    await tick(5);
  }
  assert.fail('condition not reached in time');
}

// ---- ChunkedUpload against an in-memory REST fake ----------------------------------------
function fakeServer({ failEvery = 0 } = {}) {
  const uploads = new Map();
  const log = [];
  let n = 0;
  const json = (status, body) => new Response(body === undefined ? null : JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
  const status = (u) => {
    const missing = [];
    let bytes = 0;
    for (let i = 0; i < u.count; i++) {
      if (u.chunks.has(i)) bytes += Math.min(u.cs, u.size - i * u.cs); else missing.push(i);
    }
    return { id: u.id, state: u.state, total_bytes: u.size, chunk_size: u.cs, chunk_count: u.count, chunks_done: u.count - missing.length, bytes_done: bytes, missing, ...(u.state === 'complete' ? { path: `/x/${u.id}` } : {}) };
  };
  const fetchImpl = async (url, init = {}) => {
    const method = init.method || 'GET';
    const p = new URL(url, 'http://x').pathname;
    log.push(`${method} ${p}`);
    let m;
    if (method === 'POST' && p === '/api/uploads') {
      const b = JSON.parse(init.body);
      const id = crypto.randomBytes(16).toString('hex').replace(/[^0-9a-z]/g, '').slice(0, 26).padEnd(26, 'a');
      const cs = b.chunk_size || 4;
      uploads.set(id, { id, size: b.size, cs, count: Math.max(1, Math.ceil(b.size / cs)), chunks: new Map(), state: 'uploading' });
      return json(201, { id, chunk_size: cs, chunk_count: uploads.get(id).count, channel: `private-upload.${id}` });
    }
    if ((m = /^\/api\/uploads\/([0-9a-z]{26})$/.exec(p))) {
      const u = uploads.get(m[1]);
      if (!u) return json(404, { error: 'not found' });
      if (method === 'DELETE') { uploads.delete(m[1]); return new Response(null, { status: 204 }); }
      return json(200, status(u));
    }
    if ((m = /^\/api\/uploads\/([0-9a-z]{26})\/chunks\/(\d+)$/.exec(p)) && method === 'PUT') {
      const u = uploads.get(m[1]);
      if (!u) return json(404, { error: 'not found' });
      if (failEvery && ++n % failEvery === 0) return json(503, { error: 'try again' });
      const buf = Buffer.from(await new Response(init.body).arrayBuffer());
      const want = init.headers['X-Chunk-Checksum'];
      if (want !== `sha256:${crypto.createHash('sha256').update(buf).digest('hex')}`) return json(422, { error: 'checksum' });
      u.chunks.set(Number(m[2]), buf);
      return json(200, status(u));
    }
    if ((m = /^\/api\/uploads\/([0-9a-z]{26})\/complete$/.exec(p)) && method === 'POST') {
      const u = uploads.get(m[1]);
      if (!u) return json(404, { error: 'not found' });
      if (status(u).missing.length) return json(409, { error: 'missing chunks' });
      u.state = 'complete';
      return json(200, status(u));
    }
    return json(404, { error: 'no route' });
  };
  return { uploads, log, fetchImpl, assemble: (u) => Buffer.concat([...Array(u.count).keys()].map((i) => u.chunks.get(i))) };
}

function memoryStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), removeItem: (k) => m.delete(k), map: m };
}

test('upload: chunks, checksums, retries of 503 with backoff, completes with identical bytes', async (t) => {
  const origFetch = globalThis.fetch;
  const srv = fakeServer({ failEvery: 3 });
  globalThis.fetch = srv.fetchImpl; // the node fallback of the PUT path uses global fetch
  t.after(() => { globalThis.fetch = origFetch; });
  const data = crypto.randomBytes(103);
  const file = new File([data], 'a.bin', { lastModified: 1 });
  const storage = memoryStorage();
  const u = new ChunkedUpload(file, { fetch: srv.fetchImpl, chunkSize: 10, parallel: 3, storage, retryBaseMs: 1, retryMaxMs: 5, pollIntervalMs: 10 });
  const states = [];
  const progress = [];
  u.addEventListener('state', (e) => states.push(e.detail.state));
  u.addEventListener('progress', (e) => progress.push(e.detail.bytesDone));
  const final = await u.start();
  assert.equal(final.state, 'complete');
  assert.deepEqual(states, ['uploading', 'complete']);
  assert.equal(u.bytesDone, 103);
  assert.ok(progress.length >= 5, 'progress events');
  for (let i = 1; i < progress.length; i++) assert.ok(progress[i] >= progress[i - 1], 'never backwards');
  assert.ok(srv.log.filter((l) => l.startsWith('PUT')).length > 11, 'some chunks were retried');
  assert.deepEqual(srv.assemble([...srv.uploads.values()][0]), data);
  assert.equal(storage.map.size, 0, 'forgotten once complete');
});

test('upload: pause, resume, and a new ChunkedUpload of the same file resumes by fingerprint', async (t) => {
  const origFetch = globalThis.fetch;
  const srv = fakeServer();
  // slow PUTs so that pausing catches some in flight
  const slow = async (url, init) => { if (init?.method === 'PUT') await tick(5); return srv.fetchImpl(url, init); };
  globalThis.fetch = slow;
  t.after(() => { globalThis.fetch = origFetch; });
  const data = crypto.randomBytes(200);
  const file = new File([data], 'b.bin', { lastModified: 2 });
  const storage = memoryStorage();
  const u1 = new ChunkedUpload(file, { fetch: slow, chunkSize: 10, parallel: 2, storage });
  u1.start();
  await waitUntil(() => u1.id && srv.uploads.get(u1.id)?.chunks.size >= 6, 5000);
  u1.pause();
  assert.equal(u1.state, UploadState.PAUSED);
  await tick(30);
  const storedAtPause = new Set(srv.uploads.get(u1.id).chunks.keys());
  assert.ok(storedAtPause.size < 20);
  assert.equal(storage.map.size, 1, 'id remembered');

  // "reload": a new object for the same file
  const before = srv.log.length;
  const u2 = new ChunkedUpload(new File([data], 'b.bin', { lastModified: 2 }), { fetch: slow, chunkSize: 10, parallel: 2, storage });
  await u2.start();
  assert.equal(u2.id, u1.id);
  assert.ok(u2.resumed);
  const resent = srv.log.slice(before).filter((l) => l.startsWith('PUT')).map((l) => Number(l.split('/').pop())).filter((i) => storedAtPause.has(i));
  assert.deepEqual(resent, [], 'no stored chunk sent again');
  assert.deepEqual(srv.assemble(srv.uploads.get(u2.id)), data);
});

test('upload: cancel deletes the upload on the server', async (t) => {
  const origFetch = globalThis.fetch;
  const srv = fakeServer();
  const slow = async (url, init) => { if (init?.method === 'PUT') await tick(5); return srv.fetchImpl(url, init); };
  globalThis.fetch = slow;
  t.after(() => { globalThis.fetch = origFetch; });
  const file = new File([crypto.randomBytes(100)], 'c.bin', { lastModified: 3 });
  const u = new ChunkedUpload(file, { fetch: slow, chunkSize: 10, parallel: 1, storage: memoryStorage() });
  u.start();
  await waitUntil(() => u.id && srv.uploads.get(u.id)?.chunks.size >= 2, 5000);
  await u.cancel();
  assert.equal(u.state, UploadState.ABORTED);
  assert.equal(srv.uploads.size, 0);
  await assert.rejects(u.done, /cancelled/);
});
