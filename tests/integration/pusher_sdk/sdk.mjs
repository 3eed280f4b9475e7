// The hub against the official Pusher server SDK for Node (`pusher`) and
// pusher-js clients. Usage: node sdk.mjs '<json>' with
//   {"app_id", "key", "secret", "ports": [hub port of host A, (of host B)]}
// The SDK talks to host A; client 1 is connected to A, client 2 to the last
// host (B when there are two: then every answer must cover both hosts).
// Prints one line per check ("ok <name>") and exits 1 at the first failure.
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const PusherServer = require("pusher");
const PusherClient = require("pusher-js");

const cfg = JSON.parse(process.argv[2]);
const [portA] = cfg.ports;
const portB = cfg.ports[cfg.ports.length - 1];
const sdk = new PusherServer({
  appId: cfg.app_id,
  key: cfg.key,
  secret: cfg.secret,
  host: "127.0.0.1",
  port: String(portA),
  useTLS: false,
  timeout: 5000,
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function check(name) {
  console.log(`ok ${name}`);
}

async function within(ms, what, fn) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      return await fn();
    } catch (e) {
      last = e;
    }
    await sleep(50);
  }
  throw new Error(`${what}: ${last && last.message}`);
}

/// A pusher-js client whose private and presence subscriptions are
/// authorized by the server SDK (as an app's auth endpoint would).
function client(port, user) {
  const c = new PusherClient(cfg.key, {
    wsHost: "127.0.0.1",
    wsPort: port,
    forceTLS: false,
    enabledTransports: ["ws"],
    cluster: "local",
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const presence = channelName.startsWith("presence-")
          ? { user_id: user, user_info: { name: user } }
          : undefined;
        callback(null, sdk.authorizeChannel(socketId, channelName, presence));
      },
    },
  });
  c.received = [];
  c.bind_global((event, data) => {
    if (!event.startsWith("pusher:") && !event.startsWith("pusher_internal:")) {
      c.received.push({ event, data });
    }
  });
  return c;
}

function connected(c) {
  return new Promise((resolve, reject) => {
    if (c.connection.state === "connected") return resolve();
    c.connection.bind("connected", resolve);
    c.connection.bind("failed", () => reject(new Error("connection failed")));
  });
}

function subscribed(c, name) {
  return new Promise((resolve, reject) => {
    const ch = c.subscribe(name);
    ch.bind("pusher:subscription_succeeded", () => resolve(ch));
    ch.bind("pusher:subscription_error", (e) => reject(new Error(`${name}: ${JSON.stringify(e)}`)));
  });
}

/// Waits until client `c` received `event` (with `pred` on its data).
function got(c, event, pred = () => true, ms = 5000) {
  return within(ms, `${event} not received`, async () => {
    const m = c.received.find((m) => m.event === event && pred(m.data));
    assert.ok(m, `${event} not received yet`);
    return m;
  });
}

async function status(promise) {
  try {
    const res = await promise;
    return res.status;
  } catch (e) {
    return e.status;
  }
}

async function json(res) {
  return JSON.parse(await (await res).text());
}

const c1 = client(portA, "u1");
const c2 = client(portB, "u2");
try {
  await Promise.all([connected(c1), connected(c2)]);
  await Promise.all([subscribed(c1, "news"), subscribed(c2, "news"), subscribed(c2, "other")]);

  // Host B subscribes in Redis asynchronously: probe until its client gets events.
  let i = 0;
  await within(10000, "events never reached client 2", async () => {
    i += 1;
    await sdk.trigger("other", "probe", { i });
    await sleep(100);
    assert.ok(c2.received.some((m) => m.event === "probe"));
  });
  await within(10000, "events never reached client 2 on news", async () => {
    i += 1;
    await sdk.trigger("news", "probe-news", { i });
    await sleep(100);
    assert.ok(c2.received.some((m) => m.event === "probe-news"));
  });

  await sdk.trigger("news", "hello", { n: 1 });
  for (const c of [c1, c2]) assert.deepEqual((await got(c, "hello")).data, { n: 1 });
  check("trigger");

  await sdk.triggerBatch([
    { channel: "news", name: "b1", data: { k: 1 } },
    { channel: "other", name: "b2", data: "plain text" },
  ]);
  assert.deepEqual((await got(c1, "b1")).data, { k: 1 });
  assert.deepEqual((await got(c2, "b1")).data, { k: 1 });
  assert.equal((await got(c2, "b2")).data, "plain text");
  check("triggerBatch");

  await sdk.trigger(["news", "other"], "multi", { m: true });
  await got(c1, "multi");
  await within(5000, "multi on both channels", async () => {
    assert.equal(c2.received.filter((m) => m.event === "multi").length, 2);
  });
  assert.equal(c1.received.filter((m) => m.event === "multi").length, 1);
  check("multi-channel trigger");

  await sdk.trigger("news", "not-for-1", {}, { socket_id: c1.connection.socket_id });
  await got(c2, "not-for-1");
  await sdk.trigger("news", "after", {});
  await got(c1, "after");
  assert.ok(!c1.received.some((m) => m.event === "not-for-1"), "the excluded socket got the event");
  check("socket_id exclusion");

  const wrong = new PusherServer({
    appId: cfg.app_id,
    key: cfg.key,
    secret: "wrong",
    host: "127.0.0.1",
    port: String(portA),
    useTLS: false,
  });
  assert.equal(await status(wrong.trigger("news", "x", {})), 401);
  check("wrong secret is 401");

  assert.equal(await status(sdk.trigger("news", "big", "x".repeat(11000))), 413);
  check("event over 10 KB is 413");

  await subscribed(c1, "private-room");
  await sdk.trigger("private-room", "secret", { s: 1 });
  assert.deepEqual((await got(c1, "secret")).data, { s: 1 });
  check("SDK-signed private auth");

  const p1 = await subscribed(c1, "presence-lobby");
  const p2 = await subscribed(c2, "presence-lobby");
  assert.equal(p1.members.me.id, "u1");
  assert.equal(p2.members.me.id, "u2");
  check("SDK-signed presence auth");

  // Queries: with two hosts the answers must count host B's clients too.
  await within(5000, "user_count", async () => {
    const v = await json(sdk.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count" } }));
    assert.deepEqual(v, { channels: { "presence-lobby": { user_count: 2 } } });
  });
  const all = await json(sdk.get({ path: "/channels" }));
  assert.deepEqual(Object.keys(all.channels).sort(), ["news", "other", "presence-lobby", "private-room"]);
  assert.deepEqual(all.channels.news, {});
  check("GET /channels (filter_by_prefix, info=user_count)");

  const one = await json(sdk.get({ path: "/channels/presence-lobby", params: { info: "subscription_count,user_count" } }));
  assert.deepEqual(one, { occupied: true, subscription_count: 2, user_count: 2 });
  const news = await json(sdk.get({ path: "/channels/news", params: { info: "subscription_count" } }));
  assert.deepEqual(news, { occupied: true, subscription_count: 2 });
  const empty = await json(sdk.get({ path: "/channels/nobody" }));
  assert.deepEqual(empty, { occupied: false });
  check("GET /channels/{name} (info=subscription_count,user_count)");

  const users = await json(sdk.get({ path: "/channels/presence-lobby/users" }));
  assert.deepEqual(users, { users: [{ id: "u1" }, { id: "u2" }] });
  check("GET /channels/{name}/users");

  // The same query twice within one second carries the same signature: answered.
  const again = await Promise.all([1, 2].map(() => status(sdk.get({ path: "/channels/news" }))));
  assert.deepEqual(again, [200, 200]);
  check("identical GET queries are not refused as replays");

  const closed = new Promise((resolve) => {
    c2.connection.bind("state_change", ({ current }) => {
      if (current !== "connected") resolve(current);
    });
  });
  assert.equal(await status(sdk.terminateUserConnections("u2")), 200);
  await Promise.race([closed, sleep(5000).then(() => { throw new Error("u2 not disconnected"); })]);
  assert.equal(c1.connection.state, "connected");
  check("terminate_connections");
} finally {
  c1.disconnect();
  c2.disconnect();
}
process.exit(0);
