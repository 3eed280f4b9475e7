// The common hand-made alternative to the hub: a Node `ws` server that speaks just
// enough Pusher protocol 7 (connection_established, subscribe, ping) and fans out
// every event it receives on a UDP side socket to the subscribers of its channel.
//   node ws_server.mjs <ws_port> <udp_port>
// UDP datagram: "<channel>\n<event>\n<data>"
import { WebSocketServer } from 'ws';
import dgram from 'node:dgram';

const wsPort = Number(process.argv[2] || 6101);
const udpPort = Number(process.argv[3] || 6102);
const channels = new Map(); // name -> Set<ws>
let nextId = 1;

const wss = new WebSocketServer({ host: '127.0.0.1', port: wsPort, perMessageDeflate: false, clientTracking: false });
wss.on('connection', (ws) => {
  const socketId = `${process.pid}.${nextId++}`;
  const subs = new Set();
  ws.send(JSON.stringify({ event: 'pusher:connection_established', data: JSON.stringify({ socket_id: socketId, activity_timeout: 120 }) }));
  ws.on('message', (raw) => {
    let m;
    try { m = JSON.parse(raw); } catch { return; }
    if (m.event === 'pusher:subscribe' && m.data && typeof m.data.channel === 'string') {
      const name = m.data.channel;
      let set = channels.get(name);
      if (!set) { set = new Set(); channels.set(name, set); }
      set.add(ws); subs.add(name);
      ws.send(JSON.stringify({ event: 'pusher_internal:subscription_succeeded', channel: name, data: '{}' }));
    } else if (m.event === 'pusher:ping') {
      ws.send('{"event":"pusher:pong","data":"{}"}');
    }
  });
  ws.on('close', () => { for (const name of subs) channels.get(name)?.delete(ws); });
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(`ws listening ${wsPort}`));

const udp = dgram.createSocket('udp4');
udp.on('message', (buf) => {
  const s = buf.toString();
  const a = s.indexOf('\n'), b = s.indexOf('\n', a + 1);
  const channel = s.slice(0, a), event = s.slice(a + 1, b), data = s.slice(b + 1);
  const set = channels.get(channel);
  if (!set) return;
  const msg = JSON.stringify({ event, channel, data });
  for (const ws of set) ws.send(msg);
});
udp.bind(udpPort, '127.0.0.1', () => console.log(`udp listening ${udpPort}`));
