/**
 * upload-progress.js — browser client of the upload_progress PHP extension.
 *
 * Dependency-free ES module:
 *   - ChunkedUpload: uploads a File in chunks (File.slice), N in parallel, each chunk
 *     PUT with `X-Chunk-Checksum: sha256:<hex>`, retries with exponential backoff and
 *     full jitter, resumes after a reload or a network loss (upload id remembered per
 *     file fingerprint in localStorage), pause / resume / cancel.
 *   - PusherSocket: a Pusher protocol 7 client (states disconnected, connecting,
 *     connected, reconnecting), reconnect backoff with full jitter, ping/pong heartbeat,
 *     resubscribe after reconnect with private-channel auth, close code 4200 handling,
 *     stale-event (seq) filtering.
 *   - UploadProgressClient / createClient(): reads GET /api/config and ties both together;
 *     uploads fall back to polling GET /api/uploads/{id} while the socket is down.
 *
 * Events are DOM events (EventTarget); `detail` carries the data. See docs/client.md.
 */

export const VERSION = '0.1.0';

export const SocketState = Object.freeze({
  DISCONNECTED: 'disconnected',
  CONNECTING: 'connecting',
  CONNECTED: 'connected',
  RECONNECTING: 'reconnecting',
});

export const UploadState = Object.freeze({
  PENDING: 'pending',
  UPLOADING: 'uploading',
  PAUSED: 'paused',
  COMPLETE: 'complete',
  ABORTED: 'aborted',
  FAILED: 'failed',
});

const ID_RE = /^[0-9a-z]{26}$/;
const TERMINAL = new Set([UploadState.COMPLETE, UploadState.ABORTED]);

// -----------------------------------------------------------------------------------------
// small helpers
// -----------------------------------------------------------------------------------------

/** Exponential backoff with full jitter: a uniform delay in [0, min(maxMs, baseMs * 2^attempt)). */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 30000, random = Math.random } = {}) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(random() * cap);
}

function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}

function abortError(message = 'aborted') {
  const e = new Error(message);
  e.name = 'AbortError';
  return e;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) { reject(abortError()); return; }
    const t = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, Math.max(0, ms));
    function onAbort() { clearTimeout(t); reject(abortError()); }
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function isOnline() {
  return typeof navigator === 'undefined' || navigator.onLine !== false;
}

function waitOnline(signal) {
  if (isOnline() || typeof window === 'undefined') return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = () => { window.removeEventListener('online', done); signal?.removeEventListener('abort', onAbort); resolve(); };
    const onAbort = () => { window.removeEventListener('online', done); reject(abortError()); };
    window.addEventListener('online', done);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function defaultStorage() {
  try {
    if (typeof localStorage !== 'undefined') {
      const k = '__upload_progress_probe__';
      localStorage.setItem(k, '1');
      localStorage.removeItem(k);
      return localStorage;
    }
  } catch { /* private mode, disabled storage */ }
  return null;
}

function joinUrl(base, path) {
  if (!base) return path;
  return base.replace(/\/+$/, '') + path;
}

class HttpError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = 'HttpError';
    this.status = status;
    this.body = body;
  }
}

class NetworkError extends Error {
  constructor(message = 'network error') {
    super(message);
    this.name = 'NetworkError';
  }
}

function parseJson(text) {
  if (typeof text !== 'string' || text === '') return null;
  try { return JSON.parse(text); } catch { return null; }
}

function errorMessage(status, body, fallback) {
  if (body && typeof body === 'object' && typeof body.error === 'string') return body.error;
  return fallback || `HTTP ${status}`;
}

// -----------------------------------------------------------------------------------------
// SHA-256 (WebCrypto when available; a small pure-JS fallback for insecure contexts,
// where crypto.subtle does not exist, e.g. http://some-lan-host:8080)
// -----------------------------------------------------------------------------------------

const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

/** Pure-JS SHA-256 of bytes (Uint8Array / ArrayBuffer) → lowercase hex. */
export function sha256HexSync(input) {
  const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
  const len = bytes.length;
  const padLen = ((len + 9 + 63) >> 6) << 6;
  const buf = new Uint8Array(padLen);
  buf.set(bytes);
  buf[len] = 0x80;
  const dv = new DataView(buf.buffer);
  dv.setUint32(padLen - 8, Math.floor(len / 0x20000000) >>> 0);
  dv.setUint32(padLen - 4, (len * 8) >>> 0);
  const H = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const W = new Uint32Array(64);
  const ror = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padLen; off += 64) {
    for (let i = 0; i < 16; i++) W[i] = dv.getUint32(off + 4 * i);
    for (let i = 16; i < 64; i++) {
      const w15 = W[i - 15], w2 = W[i - 2];
      const s0 = ror(w15, 7) ^ ror(w15, 18) ^ (w15 >>> 3);
      const s1 = ror(w2, 17) ^ ror(w2, 19) ^ (w2 >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
    }
    let a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (let i = 0; i < 64; i++) {
      const S1 = ror(e, 6) ^ ror(e, 11) ^ ror(e, 25);
      const ch = (e & f) ^ (~e & g);
      const t1 = (h + S1 + ch + K256[i] + W[i]) | 0;
      const S0 = ror(a, 2) ^ ror(a, 13) ^ ror(a, 22);
      const maj = (a & b) ^ (a & c) ^ (b & c);
      const t2 = (S0 + maj) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    H[0] = (H[0] + a) | 0; H[1] = (H[1] + b) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
    H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
  }
  let hex = '';
  for (let i = 0; i < 8; i++) hex += (H[i] >>> 0).toString(16).padStart(8, '0');
  return hex;
}

/** SHA-256 of a Blob / ArrayBuffer / Uint8Array → lowercase hex. */
export async function sha256Hex(data) {
  const buf = typeof Blob !== 'undefined' && data instanceof Blob ? await data.arrayBuffer() : data;
  const subtle = globalThis.crypto?.subtle;
  if (subtle) {
    const digest = await subtle.digest('SHA-256', buf);
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
  }
  return sha256HexSync(buf);
}

// -----------------------------------------------------------------------------------------
// Pusher protocol 7 socket
// -----------------------------------------------------------------------------------------

export class Channel extends EventTarget {
  constructor(socket, name) {
    super();
    this.socket = socket;
    this.name = name;
    this.subscribed = false;
    this.lastSeq = null;
    this.staleDropped = 0;
    this._listeners = [];
  }

  get isPrivate() { return this.name.startsWith('private-') || this.name.startsWith('presence-'); }

  /** Pusher-style binding: callback(data, eventName). Returns an unbind function. */
  bind(event, callback) {
    const fn = (e) => callback(e.detail, event);
    this.addEventListener(event, fn);
    this._listeners.push([event, fn]);
    return () => this.removeEventListener(event, fn);
  }

  unbindAll() {
    for (const [event, fn] of this._listeners) this.removeEventListener(event, fn);
    this._listeners = [];
  }

  /** Called by the socket for every event of this channel; returns false when dropped as stale. */
  _deliver(event, data) {
    if (data && typeof data === 'object' && typeof data.seq === 'number') {
      if (this.lastSeq !== null && data.seq <= this.lastSeq) {
        this.staleDropped++;
        return false;
      }
      this.lastSeq = data.seq;
    }
    emit(this, event, data);
    emit(this, 'event', { event, data });
    return true;
  }
}

/**
 * A Pusher Channels protocol 7 client.
 *
 * options: key (required), wsHost, wsPort, wsPath (prefix before /app/{key}), forceTLS,
 * authEndpoint ('/api/broadcasting/auth'), authHeaders, activityTimeoutMs (120000),
 * pongTimeoutMs (30000), connectTimeoutMs (10000), reconnectBaseMs (500),
 * reconnectMaxMs (30000), WebSocket (implementation), fetch (implementation).
 *
 * Events: statechange {previous, current}, connected {socketId}, error {code?, message},
 * message {event, channel, data} (every frame), subscribed {channel},
 * subscription_error {channel, status, error}.
 */
export class PusherSocket extends EventTarget {
  constructor(options = {}) {
    super();
    const loc = typeof location !== 'undefined' ? location : null;
    const https = loc ? loc.protocol === 'https:' : false;
    this.options = {
      key: 'upload-progress',
      wsHost: loc ? loc.hostname : '127.0.0.1',
      wsPort: loc ? (Number(loc.port) || (https ? 443 : 80)) : 6001,
      wsPath: '',
      forceTLS: https,
      authEndpoint: '/api/broadcasting/auth',
      authHeaders: {},
      activityTimeoutMs: 120000,
      pongTimeoutMs: 30000,
      connectTimeoutMs: 10000,
      reconnectBaseMs: 500,
      reconnectMaxMs: 30000,
      random: Math.random,
      ...options,
    };
    this.state = SocketState.DISCONNECTED;
    this.socketId = null;
    this.channels = new Map();
    this.attempt = 0;
    this.lastError = null;
    this._ws = null;
    this._wanted = false;
    this._timers = { reconnect: null, connect: null, activity: null, pong: null };
    this._activityMs = this.options.activityTimeoutMs;
    this._onOnline = () => { if (this._wanted && this.state === SocketState.RECONNECTING) this._reconnectNow(0); };
    this._onOffline = () => {
      // Probe at once: a dead connection is noticed in seconds, not after activity_timeout.
      if (this._ws && this.state === SocketState.CONNECTED && this._send({ event: 'pusher:ping', data: {} })) this._armPongTimer(Math.min(5000, this.options.pongTimeoutMs));
    };
    this._onVisible = () => {
      if (this._wanted && typeof document !== 'undefined' && document.visibilityState === 'visible' && this.state === SocketState.RECONNECTING) this._reconnectNow(0);
    };
  }

  get url() {
    const o = this.options;
    const scheme = o.forceTLS ? 'wss' : 'ws';
    const host = String(o.wsHost).includes(':') && !String(o.wsHost).startsWith('[') ? `[${o.wsHost}]` : o.wsHost;
    const path = (o.wsPath || '').replace(/\/+$/, '');
    return `${scheme}://${host}:${o.wsPort}${path}/app/${encodeURIComponent(o.key)}?protocol=7&client=upload-progress-js&version=${VERSION}&flash=false`;
  }

  get connected() { return this.state === SocketState.CONNECTED; }

  connect() {
    this._wanted = true;
    if (typeof window !== 'undefined') {
      window.addEventListener('online', this._onOnline);
      window.addEventListener('offline', this._onOffline);
    }
    if (typeof document !== 'undefined') document.addEventListener('visibilitychange', this._onVisible);
    if (!this._ws && this.state !== SocketState.RECONNECTING) this._open();
    return this;
  }

  disconnect() {
    this._wanted = false;
    if (typeof window !== 'undefined') {
      window.removeEventListener('online', this._onOnline);
      window.removeEventListener('offline', this._onOffline);
    }
    if (typeof document !== 'undefined') document.removeEventListener('visibilitychange', this._onVisible);
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) { try { ws.close(1000, 'client disconnect'); } catch { /* ignore */ } }
    this._markUnsubscribed();
    this.socketId = null;
    this._setState(SocketState.DISCONNECTED);
  }

  /** Subscribe (or return the existing subscription) to a channel; works before connect. */
  subscribe(name) {
    let ch = this.channels.get(name);
    if (!ch) {
      ch = new Channel(this, name);
      this.channels.set(name, ch);
    }
    if (this.state === SocketState.CONNECTED && !ch.subscribed && !ch._pending) this._subscribeChannel(ch);
    return ch;
  }

  unsubscribe(name) {
    const ch = this.channels.get(name);
    if (!ch) return;
    this.channels.delete(name);
    ch.unbindAll();
    if (this.state === SocketState.CONNECTED && ch.subscribed) this._send({ event: 'pusher:unsubscribe', data: { channel: name } });
    ch.subscribed = false;
  }

  channel(name) { return this.channels.get(name) || null; }

  // ---- internals ---------------------------------------------------------------------
  _setState(next) {
    if (next === this.state) return;
    const previous = this.state;
    this.state = next;
    emit(this, 'statechange', { previous, current: next });
  }

  _clearTimers() {
    for (const k of Object.keys(this._timers)) {
      clearTimeout(this._timers[k]);
      this._timers[k] = null;
    }
  }

  _open() {
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    this._setState(this.attempt > 0 || this.socketIdSeen ? SocketState.RECONNECTING : SocketState.CONNECTING);
    const Impl = this.options.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      ws = new Impl(this.url);
    } catch (err) {
      this.lastError = { message: String(err?.message || err) };
      this._scheduleReconnect(null);
      return;
    }
    this._ws = ws;
    this._timers.connect = setTimeout(() => {
      if (this._ws === ws && this.state !== SocketState.CONNECTED) this._drop(ws, 4000, 'connect timeout', true);
    }, this.options.connectTimeoutMs);
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => { /* a close event follows */ };
  }

  _send(obj) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(obj));
      return true;
    } catch {
      return false;
    }
  }

  /** Forget a socket at once (dead peer): do not wait for a close handshake that may never come. */
  _drop(ws, code, reason, transient = true) {
    if (ws !== this._ws) return;
    try { ws.onclose = null; ws.onmessage = null; ws.close(); } catch { /* ignore */ }
    this._onClose(ws, transient ? 4999 : code, reason, true);
  }

  _onClose(ws, code, reason, forced = false) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearTimeout(this._timers.connect);
    clearTimeout(this._timers.activity);
    clearTimeout(this._timers.pong);
    this.socketId = null;
    this._markUnsubscribed();
    if (!this._wanted) {
      this._setState(SocketState.DISCONNECTED);
      return;
    }
    if (code >= 4000 && code < 4100 && !forced) {
      // Pusher: 4000-4099 means "do not reconnect" (unknown app, unauthorized, ...).
      this.lastError = { code, message: reason || `closed with code ${code}` };
      emit(this, 'error', this.lastError);
      this._wanted = false;
      this._setState(SocketState.DISCONNECTED);
      return;
    }
    this._scheduleReconnect(code);
  }

  _scheduleReconnect(code) {
    const o = this.options;
    let delay;
    if (code >= 4200 && code < 4300) {
      // "reconnect now": a hub restart/hand-over. Spread clients a little, not all in one instant.
      this.attempt = 0;
      delay = Math.floor(o.random() * Math.min(1000, o.reconnectBaseMs * 2));
    } else if (code >= 4100 && code < 4200) {
      delay = Math.max(1000, backoffDelay(this.attempt, { baseMs: o.reconnectBaseMs, maxMs: o.reconnectMaxMs, random: o.random }));
      this.attempt++;
    } else {
      delay = backoffDelay(this.attempt, { baseMs: o.reconnectBaseMs, maxMs: o.reconnectMaxMs, random: o.random });
      this.attempt++;
    }
    this.nextRetryMs = delay;
    this._setState(SocketState.RECONNECTING);
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      if (this._wanted && !this._ws) this._open();
    }, delay);
  }

  _reconnectNow(delay) {
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      if (this._wanted && !this._ws) this._open();
    }, delay);
  }

  _markUnsubscribed() {
    for (const ch of this.channels.values()) {
      ch.subscribed = false;
      ch._pending = false;
    }
  }

  _armActivityTimer() {
    clearTimeout(this._timers.activity);
    const ws = this._ws;
    this._timers.activity = setTimeout(() => {
      if (ws !== this._ws) return;
      this._send({ event: 'pusher:ping', data: {} });
      this._armPongTimer(this.options.pongTimeoutMs);
    }, this._activityMs);
  }

  _armPongTimer(ms) {
    clearTimeout(this._timers.pong);
    const ws = this._ws;
    this._timers.pong = setTimeout(() => {
      if (ws === this._ws) this._drop(ws, 4201, 'pong timeout');
    }, ms);
  }

  _onMessage(ws, ev) {
    if (ws !== this._ws) return;
    // Any traffic proves the peer alive.
    clearTimeout(this._timers.pong);
    this._armActivityTimer();
    let msg;
    try {
      msg = JSON.parse(typeof ev.data === 'string' ? ev.data : String(ev.data));
    } catch {
      return;
    }
    if (!msg || typeof msg.event !== 'string') return;
    let data = msg.data;
    if (typeof data === 'string') {
      const parsed = parseJson(data);
      if (parsed !== null) data = parsed;
    }
    emit(this, 'message', { event: msg.event, channel: msg.channel, data });
    switch (msg.event) {
      case 'pusher:connection_established': {
        clearTimeout(this._timers.connect);
        this.socketId = data?.socket_id ?? null;
        this.socketIdSeen = true;
        const serverTimeout = Number(data?.activity_timeout);
        this._activityMs = serverTimeout > 0 ? Math.min(this.options.activityTimeoutMs, serverTimeout * 1000) : this.options.activityTimeoutMs;
        this._armActivityTimer();
        this.attempt = 0;
        this.lastError = null;
        this._setState(SocketState.CONNECTED);
        emit(this, 'connected', { socketId: this.socketId });
        for (const ch of this.channels.values()) this._subscribeChannel(ch);
        return;
      }
      case 'pusher:ping':
        this._send({ event: 'pusher:pong', data: {} });
        return;
      case 'pusher:pong':
        return;
      case 'pusher:error': {
        const code = Number(data?.code) || null;
        this.lastError = { code, message: data?.message || 'pusher error' };
        emit(this, 'error', this.lastError);
        // The server closes the connection right after; its close code decides what follows.
        return;
      }
      case 'pusher_internal:subscription_succeeded': {
        const ch = this.channels.get(msg.channel);
        if (ch) {
          ch.subscribed = true;
          ch._pending = false;
          ch._authAttempt = 0;
          emit(ch, 'subscribed', { channel: ch.name });
          emit(this, 'subscribed', { channel: ch.name });
        }
        return;
      }
      case 'pusher:subscription_error': {
        const ch = this.channels.get(msg.channel);
        if (ch) {
          ch._pending = false;
          const detail = { channel: ch.name, status: data?.status ?? null, error: data?.error || data?.message || data?.type || 'subscription refused' };
          emit(ch, 'subscription_error', detail);
          emit(this, 'subscription_error', detail);
        }
        return;
      }
      default: {
        if (!msg.channel) return;
        if (msg.event.startsWith('pusher_internal:') || msg.event.startsWith('pusher:')) return;
        const ch = this.channels.get(msg.channel);
        if (ch) ch._deliver(msg.event, data);
      }
    }
  }

  async _authorize(ch, socketId) {
    const f = this.options.fetch || globalThis.fetch.bind(globalThis);
    const body = new URLSearchParams({ socket_id: socketId, channel_name: ch.name });
    const res = await f(this.options.authEndpoint, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json', ...this.options.authHeaders },
      body: body.toString(),
      credentials: 'same-origin',
    });
    const text = await res.text();
    const json = parseJson(text);
    if (!res.ok || !json || typeof json.auth !== 'string') {
      throw new HttpError(res.status, errorMessage(res.status, json, `auth endpoint answered ${res.status}`), json);
    }
    return json;
  }

  async _subscribeChannel(ch) {
    if (this.state !== SocketState.CONNECTED || ch._pending || ch.subscribed) return;
    ch._pending = true;
    const ws = this._ws;
    const socketId = this.socketId;
    const data = { channel: ch.name };
    if (ch.isPrivate) {
      try {
        const auth = await this._authorize(ch, socketId);
        data.auth = auth.auth;
        if (auth.channel_data) data.channel_data = auth.channel_data;
      } catch (err) {
        ch._pending = false;
        const detail = { channel: ch.name, status: err.status ?? null, error: err.message };
        emit(ch, 'subscription_error', detail);
        emit(this, 'subscription_error', detail);
        // A refusal (4xx) is final; a transient failure is retried with backoff.
        if (!(err.status >= 400 && err.status < 500) && this.channels.get(ch.name) === ch) {
          const attempt = (ch._authAttempt = (ch._authAttempt || 0) + 1);
          const delay = backoffDelay(attempt, { baseMs: this.options.reconnectBaseMs, maxMs: this.options.reconnectMaxMs, random: this.options.random });
          setTimeout(() => { if (this._ws === ws && this.channels.get(ch.name) === ch) this._subscribeChannel(ch); }, delay);
        }
        return;
      }
    }
    // The connection may have changed while we were authorizing: the new one resubscribes.
    if (this._ws !== ws || this.socketId !== socketId || this.channels.get(ch.name) !== ch) {
      ch._pending = false;
      return;
    }
    if (!this._send({ event: 'pusher:subscribe', data })) ch._pending = false;
  }
}

// -----------------------------------------------------------------------------------------
// HTTP helpers
// -----------------------------------------------------------------------------------------

function xhrRequest(method, url, body, headers, { onProgress, signal, timeoutMs = 0 } = {}) {
  if (typeof XMLHttpRequest === 'undefined') {
    // Non-browser environments: fetch (no upload progress).
    const controller = new AbortController();
    const onAbort = () => controller.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    return fetch(url, { method, body, headers, signal: controller.signal, duplex: 'half' })
      .then(async (res) => ({ status: res.status, text: await res.text() }))
      .catch((err) => { throw signal?.aborted ? abortError() : new NetworkError(err?.message); })
      .finally(() => signal?.removeEventListener('abort', onAbort));
  }
  return new Promise((resolve, reject) => {
    if (signal?.aborted) { reject(abortError()); return; }
    const xhr = new XMLHttpRequest();
    xhr.open(method, url, true);
    for (const [k, v] of Object.entries(headers || {})) xhr.setRequestHeader(k, v);
    if (timeoutMs) xhr.timeout = timeoutMs;
    if (onProgress) xhr.upload.onprogress = (e) => onProgress(e.loaded);
    const onAbort = () => xhr.abort();
    const cleanup = () => signal?.removeEventListener('abort', onAbort);
    xhr.onload = () => { cleanup(); resolve({ status: xhr.status, text: xhr.responseText }); };
    xhr.onerror = () => { cleanup(); reject(new NetworkError(`network error on ${method} ${url}`)); };
    xhr.ontimeout = () => { cleanup(); reject(new NetworkError(`timeout on ${method} ${url}`)); };
    xhr.onabort = () => { cleanup(); reject(abortError()); };
    signal?.addEventListener('abort', onAbort, { once: true });
    xhr.send(body ?? null);
  });
}

async function jsonRequest(fetchImpl, method, url, body, headers = {}, signal) {
  let res;
  try {
    res = await fetchImpl(url, {
      method,
      headers: { Accept: 'application/json', ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}), ...headers },
      body: body !== undefined ? JSON.stringify(body) : undefined,
      signal,
      credentials: 'same-origin',
      cache: 'no-store',
    });
  } catch (err) {
    if (signal?.aborted) throw abortError();
    throw new NetworkError(err?.message);
  }
  const text = await res.text().catch(() => '');
  return { status: res.status, json: parseJson(text), text };
}

function retryable(status) {
  return status === 0 || status === 408 || status === 425 || status === 429 || (status >= 500 && status !== 501 && status !== 507);
}

// -----------------------------------------------------------------------------------------
// Rate estimate
// -----------------------------------------------------------------------------------------

class RateMeter {
  constructor(windowMs = 5000) {
    this.windowMs = windowMs;
    this.samples = [];
  }

  add(bytes, t = Date.now()) {
    const s = this.samples;
    if (s.length && bytes < s[s.length - 1].b) s.length = 0; // went down (failed chunk): restart
    s.push({ t, b: bytes });
    while (s.length > 2 && t - s[0].t > this.windowMs) s.shift();
  }

  rate() {
    const s = this.samples;
    if (s.length < 2) return 0;
    const dt = (s[s.length - 1].t - s[0].t) / 1000;
    return dt > 0.05 ? (s[s.length - 1].b - s[0].b) / dt : 0;
  }

  reset() { this.samples = []; }
}

// -----------------------------------------------------------------------------------------
// Chunked upload
// -----------------------------------------------------------------------------------------

/**
 * Upload one File in chunks. Options:
 *   endpoint ('/api/uploads'), socket (PusherSocket or null), parallel (4), chunkSize
 *   (null: the server's default), retries (12 per chunk), retryBaseMs (500), retryMaxMs
 *   (30000), pollIntervalMs (1000), checksum (true), storage (localStorage or null),
 *   storagePrefix ('upload-progress:'), headers ({}), metadata ({}), sha256 (hex of the
 *   whole file, checked by the server at completion), chunkDelayMs (0; demo/testing),
 *   fetch (implementation), requestTimeoutMs (0 = none).
 *
 * Events: state {state, previous}, progress {bytesDone, bytesTotal, percent, rateBps, etaS,
 * source}, chunk {index, status}, complete {path, status}, error {message, status?, fatal},
 * id {id, resumed}.
 */
export class ChunkedUpload extends EventTarget {
  constructor(file, options = {}) {
    super();
    this.file = file;
    this.options = {
      endpoint: '/api/uploads',
      socket: null,
      parallel: 4,
      chunkSize: null,
      retries: 12,
      retryBaseMs: 500,
      retryMaxMs: 30000,
      pollIntervalMs: 1000,
      checksum: true,
      storage: undefined,
      storagePrefix: 'upload-progress:',
      headers: {},
      metadata: {},
      sha256: null,
      chunkDelayMs: 0,
      requestTimeoutMs: 0,
      fetch: null,
      random: Math.random,
      ...options,
    };
    if (this.options.storage === undefined) this.options.storage = defaultStorage();
    this._fetch = this.options.fetch || globalThis.fetch.bind(globalThis);
    this.id = null;
    this.state = UploadState.PENDING;
    this.bytesTotal = file.size;
    this.bytesDone = 0;
    this.rateBps = 0;
    this.etaS = null;
    this.chunkSize = null;
    this.chunkCount = null;
    this.missing = null;
    this.path = null;
    this.resumed = false;
    this.error = null;
    this.progressSource = null;
    this.requests = 0;
    this._stored = new Set();
    this._inflight = new Map();
    this._checksums = new Map();
    this._gen = 0;
    this._abort = null;
    this._channel = null;
    this._unbind = [];
    this._pollTimer = null;
    this._lastSocketEventAt = 0;
    this._meter = new RateMeter();
    this.done = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.done.catch(() => {}); // callers may ignore it; avoid an unhandled rejection
  }

  /** localStorage key of this file: name + size + lastModified. */
  get fingerprint() {
    const f = this.file;
    return `${this.options.storagePrefix}${encodeURIComponent(f.name || '')}:${f.size}:${f.lastModified || 0}`;
  }

  get channelName() { return this.id ? `private-upload.${this.id}` : null; }

  get percent() { return this.bytesTotal > 0 ? Math.min(100, (this.bytesDone / this.bytesTotal) * 100) : (this.state === UploadState.COMPLETE ? 100 : 0); }

  /** Start (or continue) the upload; resolves with the final status when complete. */
  start() {
    if (this.state === UploadState.PENDING || this.state === UploadState.PAUSED || this.state === UploadState.FAILED) this._run();
    return this.done;
  }

  pause() {
    if (this.state !== UploadState.UPLOADING) return;
    this._halt();
    this._setState(UploadState.PAUSED);
  }

  resume() {
    if (this.state === UploadState.PAUSED || this.state === UploadState.FAILED) this._run();
    return this.done;
  }

  async cancel() {
    if (TERMINAL.has(this.state)) return;
    this._halt();
    this._forget();
    const id = this.id;
    this._setState(UploadState.ABORTED);
    this._teardownSocket();
    this._reject(abortError('upload cancelled'));
    if (id) {
      try {
        await jsonRequest(this._fetch, 'DELETE', `${this.options.endpoint}/${id}`, undefined, this.options.headers);
      } catch { /* the server expires it anyway */ }
    }
  }

  // ---- persistence ----------------------------------------------------------------
  _loadSaved() {
    const st = this.options.storage;
    if (!st) return null;
    try {
      const v = JSON.parse(st.getItem(this.fingerprint) || 'null');
      return v && typeof v.id === 'string' && ID_RE.test(v.id) ? v : null;
    } catch {
      return null;
    }
  }

  _save() {
    const st = this.options.storage;
    if (!st || !this.id) return;
    try {
      st.setItem(this.fingerprint, JSON.stringify({ id: this.id, chunkSize: this.chunkSize, chunkCount: this.chunkCount, name: this.file.name, size: this.file.size, savedAt: Date.now() }));
    } catch { /* quota */ }
  }

  _forget() {
    try { this.options.storage?.removeItem(this.fingerprint); } catch { /* ignore */ }
  }

  // ---- state & progress ---------------------------------------------------------------
  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    emit(this, 'state', { state, previous, id: this.id });
    this._updatePolling();
  }

  _progress(bytesDone, source, { rateBps = null, etaS = null, total = null, force = false } = {}) {
    if (TERMINAL.has(this.state) && !force) return;
    if (typeof total === 'number' && total >= 0) this.bytesTotal = total;
    if (typeof bytesDone !== 'number' || !Number.isFinite(bytesDone)) return;
    // Socket events are ordered by seq and may legitimately go down (a failed chunk);
    // other sources (polling, chunk responses) count stored chunks only: never go backwards for them.
    if (source !== 'socket' && bytesDone < this.bytesDone && !force) return;
    const changed = bytesDone !== this.bytesDone;
    this.bytesDone = Math.min(bytesDone, this.bytesTotal);
    this.progressSource = source;
    this._meter.add(this.bytesDone);
    this.rateBps = typeof rateBps === 'number' && rateBps >= 0 ? rateBps : Math.round(this._meter.rate());
    const remaining = Math.max(0, this.bytesTotal - this.bytesDone);
    this.etaS = typeof etaS === 'number' && etaS >= 0 ? etaS : (this.rateBps > 0 ? remaining / this.rateBps : (remaining === 0 ? 0 : null));
    if (changed || force || rateBps !== null) {
      emit(this, 'progress', {
        id: this.id,
        bytesDone: this.bytesDone,
        bytesTotal: this.bytesTotal,
        percent: this.percent,
        rateBps: this.rateBps,
        etaS: this.etaS,
        source,
      });
    }
  }

  _applyStatus(st, source) {
    if (!st || typeof st !== 'object') return;
    if (typeof st.chunk_size === 'number') this.chunkSize = st.chunk_size;
    if (typeof st.chunk_count === 'number') this.chunkCount = st.chunk_count;
    if (Array.isArray(st.missing)) {
      this.missing = st.missing.slice();
      if (this.chunkCount !== null) {
        const miss = new Set(st.missing);
        for (let i = 0; i < this.chunkCount; i++) if (!miss.has(i)) this._stored.add(i);
      }
    }
    if (typeof st.path === 'string') this.path = st.path;
    this._progress(st.bytes_done, source, { total: st.total_bytes });
  }

  // ---- socket ---------------------------------------------------------------------
  _setupSocket() {
    const socket = this.options.socket;
    if (!socket || !this.id || this._channel) return;
    const ch = socket.subscribe(this.channelName);
    this._channel = ch;
    const onEvent = (data, event) => this._onSocketEvent(event, data);
    this._unbind.push(ch.bind('progress', onEvent), ch.bind('complete', onEvent), ch.bind('aborted', onEvent), ch.bind('failed', onEvent));
    const onChange = () => this._updatePolling();
    ch.addEventListener('subscribed', onChange);
    ch.addEventListener('subscription_error', onChange);
    socket.addEventListener('statechange', onChange);
    this._unbind.push(() => {
      ch.removeEventListener('subscribed', onChange);
      ch.removeEventListener('subscription_error', onChange);
      socket.removeEventListener('statechange', onChange);
    });
  }

  _teardownSocket() {
    for (const u of this._unbind) u();
    this._unbind = [];
    if (this._channel && this.options.socket) this.options.socket.unsubscribe(this._channel.name);
    this._channel = null;
    this._updatePolling();
  }

  get socketLive() {
    const s = this.options.socket;
    return !!(s && s.state === SocketState.CONNECTED && this._channel && this._channel.subscribed);
  }

  _onSocketEvent(event, data) {
    if (!data || typeof data !== 'object') return;
    if (data.upload_id && this.id && data.upload_id !== this.id) return;
    this._lastSocketEventAt = Date.now();
    if (event === 'progress') {
      if (this.state !== UploadState.UPLOADING && this.state !== UploadState.PAUSED) return;
      this._progress(data.bytes_done, 'socket', {
        rateBps: typeof data.rate_bps === 'number' ? data.rate_bps : null,
        etaS: typeof data.eta_s === 'number' ? data.eta_s : null,
        total: data.bytes_total,
      });
    } else if (event === 'complete') {
      if (typeof data.path === 'string') this.path = data.path;
      if (this.state === UploadState.UPLOADING || this.state === UploadState.PAUSED || this.state === UploadState.PENDING) {
        // The server finished the upload (perhaps another tab did): confirm and settle.
        this._finishFromServer();
      }
    } else if (event === 'aborted') {
      if (!TERMINAL.has(this.state)) {
        this._halt();
        this._forget();
        this._setState(UploadState.ABORTED);
        this._teardownSocket();
        this._reject(abortError('upload aborted on the server'));
      }
    } else if (event === 'failed') {
      // A request of this upload failed on the server (e.g. a chunk cut short); the chunk is
      // retried here, so this is informational unless nothing is running any more.
      emit(this, 'error', { message: data.error || 'a request of this upload failed on the server', fatal: false, source: 'socket' });
    }
  }

  async _finishFromServer() {
    try {
      const r = await jsonRequest(this._fetch, 'GET', `${this.options.endpoint}/${this.id}`, undefined, this.options.headers);
      if (r.status === 200 && r.json?.state === 'complete') this._settleComplete(r.json);
    } catch { /* the running loop settles it */ }
  }

  // ---- polling (while the socket cannot deliver) ----------------------------------------
  _updatePolling() {
    const want = this.state === UploadState.UPLOADING && this.id && !this.socketLive;
    if (want && !this._pollTimer) {
      this._schedulePoll(this.options.socket ? 200 : this.options.pollIntervalMs);
    } else if (!want && this._pollTimer) {
      clearTimeout(this._pollTimer);
      this._pollTimer = null;
    }
  }

  _schedulePoll(delay) {
    clearTimeout(this._pollTimer);
    this._pollTimer = setTimeout(() => this._poll(), delay);
  }

  async _poll() {
    this._pollTimer = null;
    if (this.state !== UploadState.UPLOADING || !this.id || this.socketLive) return;
    try {
      const r = await jsonRequest(this._fetch, 'GET', `${this.options.endpoint}/${this.id}`, undefined, this.options.headers);
      if (r.status === 200 && r.json) {
        if (r.json.state === 'aborted') {
          this._onSocketEvent('aborted', { upload_id: this.id });
          return;
        }
        if (this.state === UploadState.UPLOADING) this._applyStatus(r.json, 'poll');
      } else if (r.status === 404 && this.state === UploadState.UPLOADING) {
        this._onSocketEvent('aborted', { upload_id: this.id });
        return;
      }
    } catch { /* offline: try again later */ }
    if (this.state === UploadState.UPLOADING && !this.socketLive && !this._pollTimer) {
      const jitter = 0.8 + 0.4 * this.options.random();
      this._schedulePoll(this.options.pollIntervalMs * jitter);
    }
  }

  // ---- main loop ----------------------------------------------------------------
  _halt() {
    this._gen++;
    if (this._abort) this._abort.abort();
    this._abort = null;
    this._inflight.clear();
    clearTimeout(this._pollTimer);
    this._pollTimer = null;
  }

  async _withRetry(what, fn, signal) {
    for (let attempt = 0; ; attempt++) {
      await waitOnline(signal);
      try {
        return await fn();
      } catch (err) {
        if (err.name === 'AbortError') throw err;
        const status = err.status ?? 0;
        if (!retryable(status) || attempt >= this.options.retries) throw err;
        const delay = backoffDelay(attempt, { baseMs: this.options.retryBaseMs, maxMs: this.options.retryMaxMs, random: this.options.random });
        emit(this, 'error', { message: `${what}: ${err.message}; retrying in ${delay} ms`, status: status || null, fatal: false, retryInMs: delay });
        await sleep(delay, signal);
      }
    }
  }

  async _run() {
    this._halt();
    const gen = this._gen;
    const abort = new AbortController();
    this._abort = abort;
    const signal = abort.signal;
    this.error = null;
    this._setState(UploadState.UPLOADING);
    try {
      let status = null;
      if (!this.id) status = await this._resolveId(signal);
      if (gen !== this._gen) return;
      this._setupSocket();
      this._updatePolling();
      if (!status) status = await this._getStatus(signal);
      if (gen !== this._gen) return;
      for (let round = 0; ; round++) {
        if (status.state === 'complete') { this._settleComplete(status); return; }
        if (status.state === 'aborted') throw Object.assign(new Error('the upload was aborted on the server'), { status: 410, fatal: true });
        this._applyStatus(status, 'status');
        const queue = (status.missing ?? []).slice().sort((a, b) => a - b);
        if (queue.length) await this._sendChunks(queue, gen, signal);
        if (gen !== this._gen) return;
        const fin = await this._complete(signal);
        if (gen !== this._gen) return;
        if (fin.done) { this._settleComplete(fin.status); return; }
        if (round >= 5) throw new Error('the server keeps reporting missing chunks');
        status = fin.status ?? await this._getStatus(signal);
      }
    } catch (err) {
      if (gen !== this._gen || err.name === 'AbortError') return;
      this._halt();
      this.error = err;
      const fatal = !!err.fatal || err.status === 404 || err.status === 410;
      if (err.status === 404 || err.status === 410) this._forget();
      this._setState(fatal ? (err.status === 404 || err.status === 410 ? UploadState.ABORTED : UploadState.FAILED) : UploadState.FAILED);
      emit(this, 'error', { message: err.message, status: err.status ?? null, fatal: true });
      if (this.state === UploadState.ABORTED) {
        this._teardownSocket();
        this._reject(err);
      }
      // FAILED: `done` stays pending; resume() may still finish it.
    }
  }

  _settleComplete(status) {
    if (this.state === UploadState.COMPLETE) return;
    this._halt();
    if (status) {
      if (typeof status.path === 'string') this.path = status.path;
      if (Array.isArray(status.missing)) this.missing = status.missing.slice();
    }
    this._progress(this.bytesTotal, 'status', { force: true, rateBps: this.rateBps, etaS: 0 });
    this._forget();
    this._setState(UploadState.COMPLETE);
    emit(this, 'complete', { id: this.id, path: this.path, status });
    this._teardownSocket();
    this._resolve(status);
  }

  async _resolveId(signal) {
    const saved = this._loadSaved();
    if (saved) {
      const r = await this._withRetry('resume', async () => {
        const res = await jsonRequest(this._fetch, 'GET', `${this.options.endpoint}/${saved.id}`, undefined, this.options.headers, signal);
        if (retryable(res.status)) throw new HttpError(res.status, errorMessage(res.status, res.json));
        return res;
      }, signal);
      if (r.status === 200 && r.json && r.json.total_bytes === this.file.size && r.json.state !== 'aborted') {
        this.id = saved.id;
        this.resumed = true;
        this._applyStatus(r.json, 'status');
        emit(this, 'id', { id: this.id, resumed: true });
        return r.json;
      }
      this._forget();
    }
    const body = { size: this.file.size, name: this.file.name || 'upload' };
    if (this.file.type) body.type = this.file.type;
    if (this.options.chunkSize) body.chunk_size = this.options.chunkSize;
    if (this.options.sha256) body.sha256 = this.options.sha256;
    const r = await this._withRetry('create', async () => {
      const res = await jsonRequest(this._fetch, 'POST', this.options.endpoint, body, this.options.headers, signal);
      if (res.status !== 201 && res.status !== 200) {
        throw Object.assign(new HttpError(res.status, errorMessage(res.status, res.json, `creating the upload failed (${res.status})`), res.json), { fatal: !retryable(res.status) });
      }
      return res;
    }, signal);
    const j = r.json || {};
    if (!ID_RE.test(j.id || '')) throw Object.assign(new Error('the server returned no upload id'), { fatal: true });
    this.id = j.id;
    this.chunkSize = j.chunk_size;
    this.chunkCount = j.chunk_count;
    this._save();
    emit(this, 'id', { id: this.id, resumed: false });
    const missing = [];
    for (let i = 0; i < this.chunkCount; i++) missing.push(i);
    return { state: 'uploading', missing, bytes_done: 0, total_bytes: this.file.size, chunk_size: this.chunkSize, chunk_count: this.chunkCount };
  }

  async _getStatus(signal) {
    return this._withRetry('status', async () => {
      const res = await jsonRequest(this._fetch, 'GET', `${this.options.endpoint}/${this.id}`, undefined, this.options.headers, signal);
      if (res.status !== 200 || !res.json) throw Object.assign(new HttpError(res.status, errorMessage(res.status, res.json)), { fatal: res.status === 404 });
      return res.json;
    }, signal);
  }

  async _complete(signal) {
    return this._withRetry('complete', async () => {
      const res = await jsonRequest(this._fetch, 'POST', `${this.options.endpoint}/${this.id}/complete`, undefined, this.options.headers, signal);
      if (res.status === 200) return { done: true, status: res.json };
      if (res.status === 409 || (res.status === 400 && Array.isArray(res.json?.missing))) {
        return { done: false, status: null }; // chunks missing: fetch the list and send them
      }
      throw Object.assign(new HttpError(res.status, errorMessage(res.status, res.json, `completing the upload failed (${res.status})`), res.json), { fatal: !retryable(res.status) });
    }, signal);
  }

  async _sendChunks(queue, gen, signal) {
    const workers = [];
    const n = Math.max(1, Math.min(this.options.parallel | 0 || 1, queue.length));
    let failure = null;
    const next = () => queue.shift();
    for (let w = 0; w < n; w++) {
      workers.push((async () => {
        for (let index = next(); index !== undefined; index = next()) {
          if (gen !== this._gen || failure) return;
          try {
            await this._sendChunk(index, gen, signal);
          } catch (err) {
            if (!failure && err.name !== 'AbortError') failure = err;
            return;
          }
        }
      })());
    }
    await Promise.all(workers);
    if (failure) throw failure;
  }

  _chunkRange(index) {
    const start = index * this.chunkSize;
    const end = Math.min(this.file.size, start + this.chunkSize);
    return [start, end];
  }

  async _sendChunk(index, gen, signal) {
    const [start, end] = this._chunkRange(index);
    const blob = this.file.slice(start, end);
    let checksum = this._checksums.get(index) || null;
    if (this.options.checksum && !checksum) {
      checksum = `sha256:${await sha256Hex(blob)}`;
      if (this._checksums.size > 64) this._checksums.clear();
      this._checksums.set(index, checksum);
    }
    let badData = 0;
    for (let attempt = 0; ; attempt++) {
      if (gen !== this._gen) throw abortError();
      await waitOnline(signal);
      if (this.options.chunkDelayMs > 0) await sleep(this.options.chunkDelayMs, signal);
      const headers = { 'Content-Type': 'application/octet-stream', ...this.options.headers };
      if (checksum) headers['X-Chunk-Checksum'] = checksum;
      let res;
      try {
        this.requests++;
        res = await xhrRequest('PUT', `${this.options.endpoint}/${this.id}/chunks/${index}`, blob, headers, {
          signal,
          timeoutMs: this.options.requestTimeoutMs,
          onProgress: (loaded) => { if (gen === this._gen) this._inflight.set(index, loaded); },
        });
      } catch (err) {
        this._inflight.delete(index);
        if (err.name === 'AbortError' || gen !== this._gen) throw abortError();
        res = { status: 0, text: '', error: err };
      }
      this._inflight.delete(index);
      if (gen !== this._gen) throw abortError();
      const json = parseJson(res.text);
      if (res.status === 200) {
        this._stored.add(index);
        if (json) this._applyStatus(json, 'chunk');
        emit(this, 'chunk', { index, status: json });
        return;
      }
      let retry = retryable(res.status);
      if (res.status === 422 && ++badData <= 3) retry = true; // checksum/length: data damaged in transit
      // 409 with retry_after: an earlier request of ours still writes this chunk (it timed out on
      // our side, not on the server's); the server bounds that wait, so trying again is safe.
      if (res.status === 409 && typeof json?.retry_after === 'number') retry = true;
      const message = res.status ? `chunk ${index}: ${errorMessage(res.status, json)}` : `chunk ${index}: ${res.error?.message || 'network error'}`;
      if (!retry || attempt >= this.options.retries) {
        throw Object.assign(new HttpError(res.status, message, json), { fatal: res.status === 404 || res.status === 410 || res.status === 507 });
      }
      const delay = backoffDelay(attempt, { baseMs: this.options.retryBaseMs, maxMs: this.options.retryMaxMs, random: this.options.random });
      emit(this, 'error', { message: `${message}; retrying in ${delay} ms`, status: res.status || null, fatal: false, index, retryInMs: delay });
      await sleep(delay, signal);
    }
  }
}

// -----------------------------------------------------------------------------------------
// Client: config + socket + uploads
// -----------------------------------------------------------------------------------------

/**
 * options: baseUrl (''), configEndpoint ('/api/config'), socket (true), plus defaults for
 * every upload (parallel, chunkSize, retries, ...). Events: socketstate {previous, current}.
 */
export class UploadProgressClient extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = { baseUrl: '', configEndpoint: '/api/config', socket: true, ...options };
    this.config = null;
    this.socket = null;
    this.uploads = new Set();
  }

  get socketState() { return this.socket ? this.socket.state : SocketState.DISCONNECTED; }

  async init() {
    const base = this.options.baseUrl;
    try {
      const r = await jsonRequest(this.options.fetch || globalThis.fetch.bind(globalThis), 'GET', joinUrl(base, this.options.configEndpoint));
      if (r.status === 200 && r.json) this.config = r.json;
    } catch { /* no config: polling only */ }
    if (this.options.socket && this.config && (typeof WebSocket !== 'undefined' || this.options.WebSocket)) {
      const c = this.config;
      this.socket = new PusherSocket({
        key: c.key,
        wsHost: c.ws_host,
        wsPort: c.ws_port,
        wsPath: c.ws_path || '',
        forceTLS: !!c.force_tls,
        authEndpoint: joinUrl(base, c.auth_endpoint || '/api/broadcasting/auth'),
        ...(this.options.socketOptions || {}),
        ...(this.options.WebSocket ? { WebSocket: this.options.WebSocket } : {}),
      });
      this.socket.addEventListener('statechange', (e) => emit(this, 'socketstate', e.detail));
      this.socket.connect();
    }
    return this;
  }

  /** A ChunkedUpload of `file` (not started: call .start()). */
  upload(file, options = {}) {
    const { baseUrl, configEndpoint, socket, socketOptions, WebSocket: _ws, ...defaults } = this.options;
    const u = new ChunkedUpload(file, {
      endpoint: joinUrl(baseUrl, '/api/uploads'),
      ...defaults,
      ...options,
      socket: this.socket,
    });
    this.uploads.add(u);
    return u;
  }

  close() {
    for (const u of this.uploads) if (u.state === UploadState.UPLOADING) u.pause();
    this.socket?.disconnect();
  }
}

export async function createClient(options = {}) {
  const c = new UploadProgressClient(options);
  return c.init();
}

export default { createClient, UploadProgressClient, ChunkedUpload, PusherSocket, Channel, SocketState, UploadState, sha256Hex, sha256HexSync, backoffDelay, VERSION };
