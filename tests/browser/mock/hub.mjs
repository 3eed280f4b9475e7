// A minimal Pusher-protocol-7 hub for exercising the demo and the JS client before the
// extension's real hub exists. Test scaffolding only (no dependencies).
//   node hub.mjs --port N [--key K] [--secret S] [--pid-file F]
// WebSocket on /app/{key}; POST /apps/{id}/events; GET /health → {"ok":true,"pid":N}.
import http from 'node:http';
import crypto from 'node:crypto';
import fs from 'node:fs';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const port = Number(args.port || 6001);
const KEY = args.key || 'upload-progress';
const SECRET = args.secret || 'mock-secret';
if (args['pid-file']) fs.writeFileSync(args['pid-file'], String(process.pid));

const latest = new Map(); // channel -> {event, data(string), seq}
const conns = new Set();

function frame(opcode, payload) {
  const len = payload.length;
  let head;
  if (len < 126) head = Buffer.from([0x80 | opcode, len]);
  else if (len < 65536) { head = Buffer.alloc(4); head[0] = 0x80 | opcode; head[1] = 126; head.writeUInt16BE(len, 2); }
  else { head = Buffer.alloc(10); head[0] = 0x80 | opcode; head[1] = 127; head.writeBigUInt64BE(BigInt(len), 2); }
  return Buffer.concat([head, payload]);
}

class Conn {
  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.socketId = `${crypto.randomInt(1, 1e9)}.${crypto.randomInt(1, 1e9)}`;
    this.channels = new Map(); // channel -> last delivered seq
    sock.on('data', (d) => { this.buf = Buffer.concat([this.buf, d]); this.parse(); });
    sock.on('close', () => conns.delete(this));
    sock.on('error', () => conns.delete(this));
    conns.add(this);
    this.send({ event: 'pusher:connection_established', data: JSON.stringify({ socket_id: this.socketId, activity_timeout: 30 }) });
  }
  send(obj) { if (!this.sock.destroyed) this.sock.write(frame(1, Buffer.from(JSON.stringify(obj)))); }
  close(code, reason) {
    const p = Buffer.alloc(2 + Buffer.byteLength(reason));
    p.writeUInt16BE(code, 0); p.write(reason, 2);
    this.sock.write(frame(8, p));
    this.sock.end();
  }
  parse() {
    for (;;) {
      const b = this.buf;
      if (b.length < 2) return;
      const opcode = b[0] & 0x0f;
      const masked = b[1] & 0x80;
      let len = b[1] & 0x7f;
      let off = 2;
      if (len === 126) { if (b.length < 4) return; len = b.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (b.length < 10) return; len = Number(b.readBigUInt64BE(2)); off = 10; }
      const maskOff = off;
      if (masked) off += 4;
      if (b.length < off + len) return;
      const payload = Buffer.from(b.subarray(off, off + len));
      if (masked) for (let i = 0; i < len; i++) payload[i] ^= b[maskOff + (i & 3)];
      this.buf = b.subarray(off + len);
      if (opcode === 8) { this.sock.end(frame(8, payload.subarray(0, 2))); return; }
      if (opcode === 9) { this.sock.write(frame(10, payload)); continue; }
      if (opcode === 1) this.onMessage(payload.toString());
    }
  }
  onMessage(text) {
    let msg;
    try { msg = JSON.parse(text); } catch { return; }
    const data = typeof msg.data === 'string' ? JSON.parse(msg.data || '{}') : (msg.data || {});
    if (msg.event === 'pusher:ping') return this.send({ event: 'pusher:pong', data: '{}' });
    if (msg.event === 'pusher:subscribe') {
      const ch = data.channel;
      if (ch.startsWith('private-')) {
        const want = `${KEY}:${crypto.createHmac('sha256', SECRET).update(`${this.socketId}:${ch}`).digest('hex')}`;
        if (data.auth !== want) {
          return this.send({ event: 'pusher:subscription_error', channel: ch, data: JSON.stringify({ type: 'AuthError', error: 'invalid signature', status: 401 }) });
        }
      }
      this.channels.set(ch, -1);
      this.send({ event: 'pusher_internal:subscription_succeeded', channel: ch, data: '{}' });
      const l = latest.get(ch);
      if (l) this.deliver(ch, l);
      return;
    }
    if (msg.event === 'pusher:unsubscribe') { this.channels.delete(data.channel); return; }
    if (msg.event?.startsWith('client-')) this.send({ event: 'pusher:error', data: JSON.stringify({ code: null, message: 'client events are not supported' }) });
  }
  deliver(ch, ev) {
    const last = this.channels.get(ch);
    if (last === undefined) return;
    if (typeof ev.seq === 'number') {
      if (ev.seq <= last) return;
      this.channels.set(ch, ev.seq);
    }
    this.send({ event: ev.event, channel: ch, data: ev.data });
  }
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/health') {
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify({ ok: true, pid: process.pid, connections: conns.size }));
  }
  if (req.method === 'POST' && /^\/apps\/[^/]+\/events/.test(req.url)) {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      try {
        const j = JSON.parse(body);
        const channels = j.channels || [j.channel];
        let seq = null;
        try { seq = JSON.parse(j.data).seq ?? null; } catch { /* not JSON */ }
        for (const ch of channels) {
          const ev = { event: j.name, data: typeof j.data === 'string' ? j.data : JSON.stringify(j.data), seq };
          const prev = latest.get(ch);
          if (!prev || seq === null || prev.seq === null || seq > prev.seq) latest.set(ch, ev);
          for (const c of conns) c.deliver(ch, ev);
        }
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{}');
      } catch (e) {
        res.writeHead(400); res.end(String(e));
      }
    });
    return;
  }
  res.writeHead(404); res.end();
});

server.on('upgrade', (req, sock) => {
  if (!req.url.startsWith(`/app/${KEY}`)) {
    sock.end('HTTP/1.1 404 Not Found\r\n\r\n');
    return;
  }
  const accept = crypto.createHash('sha1').update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  sock.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
  sock.setNoDelay(true);
  new Conn(sock);
});

// SIGUSR2: close every connection with 4200 (reconnect now), like a hub hand-over.
process.on('SIGUSR2', () => { for (const c of conns) c.close(4200, 'restarting'); });
process.on('SIGTERM', () => process.exit(0));
server.listen(port, '127.0.0.1', () => console.log(`mock hub on ${port} pid ${process.pid}`));
