-- Folds one report of a PHP worker into the cross-host aggregation of an
-- upload and, unless the report is stale, builds the `progress` (or terminal)
-- event from the sum of all hosts' streams, stores it as the channel's latest
-- event and publishes it. Returns {seq, event, data}; {'0', '', ''} when a
-- tagged request is refused; nil when there is nothing to report.
-- KEYS: the aggregation hash, the latest-event hash, the Upload state (storage).
-- ARGV (named below, in this order; `scripts.rs` passes them). kind: 'p'
-- progress, 's' stream stored, 'f' stream failed, 't' terminal.
local events_channel, origin, ttl_s, sharded, seq_floor, now_ms, kind, upload_id_json,
  stream, bytes_total, chunk_count, stored_bytes, chunks_done, inflight,
  terminal_event, terminal_prefix, terminal_has_total, stream_stale_ms, tagged = unpack(ARGV)
local agg, latest = KEYS[1], KEYS[2]
if tagged == '1' then
  -- a plain tagged request never speaks on the channel of an Upload
  if redis.call('HGET', agg, 'upl') == '1' or redis.call('EXISTS', KEYS[3]) == 1 then
    return {'0', '', ''}
  end
else
  redis.call('HSET', agg, 'upl', '1')
end
local now = tonumber(now_ms)
local ttl = tonumber(ttl_s)
local function fmt(n) return string.format('%.0f', n) end
local function hnum(k) return tonumber(redis.call('HGET', agg, k) or '0') or 0 end
if kind ~= 't' and redis.call('HGET', agg, 'fin') == '1' then return false end
local function next_seq()
  local top = tonumber(redis.call('HGET', latest, 'top') or '0') or 0
  return math.max(top + 1, tonumber(seq_floor))
end
local function emit(event, data, seq)
  redis.call('HSET', latest, 'top', fmt(seq), 'seq', fmt(seq), 'event', event, 'data', data)
  redis.call('EXPIRE', latest, ttl)
  redis.call('EXPIRE', agg, ttl)
  local msg = origin .. '\n' .. fmt(seq) .. '\n\n' .. event .. '\n' .. data
  if sharded == '1' then redis.call('SPUBLISH', events_channel, msg) else redis.call('PUBLISH', events_channel, msg) end
  return {fmt(seq), event, data}
end
local total = hnum('total')
if kind == 't' then
  local seq = next_seq()
  local data = terminal_prefix
  if terminal_has_total == '0' and total > 0 then data = data .. '"bytes_total":' .. fmt(total) .. ',' end
  data = data .. '"seq":' .. fmt(seq) .. '}'
  local upl = redis.call('HGET', agg, 'upl')
  redis.call('DEL', agg)
  redis.call('HSET', agg, 'fin', '1')
  if upl then redis.call('HSET', agg, 'upl', upl) end
  return emit(terminal_event, data, seq)
end
local rtotal, rcount = tonumber(bytes_total), tonumber(chunk_count)
if rtotal > 0 then total = rtotal; redis.call('HSET', agg, 'total', bytes_total) end
if rcount > 0 then redis.call('HSET', agg, 'count', chunk_count) end
if total == 0 then
  local d = redis.call('HGET', latest, 'data')
  if d then
    local ok, v = pcall(cjson.decode, d)
    if ok and type(v) == 'table' and tonumber(v.bytes_total) then
      total = tonumber(v.bytes_total)
      redis.call('HSET', agg, 'total', fmt(total))
      if tonumber(v.chunk_count) then redis.call('HSET', agg, 'count', fmt(tonumber(v.chunk_count))) end
    end
  end
  if total == 0 then return false end
end
local stored, chunks = hnum('stored'), hnum('chunks')
local field = 's:' .. stream
if kind == 'p' then
  redis.call('HSET', agg, field, inflight .. ':' .. now_ms)
else
  redis.call('HDEL', agg, field)
end
if kind ~= 'f' then
  stored = math.max(stored, tonumber(stored_bytes))
  chunks = math.max(chunks, tonumber(chunks_done))
  redis.call('HSET', agg, 'stored', fmt(stored), 'chunks', fmt(chunks))
end
local inflight = 0
local all = redis.call('HGETALL', agg)
for i = 1, #all, 2 do
  local k = all[i]
  if string.sub(k, 1, 2) == 's:' then
    local b, t = string.match(all[i + 1], '^(%d+):(%d+)$')
    if b and now - tonumber(t) < tonumber(stream_stale_ms) then
      inflight = inflight + tonumber(b)
    else
      redis.call('HDEL', agg, k)
    end
  end
end
local done = stored + inflight
if total > 0 and done > total then done = total end
local rt, rb, bps = hnum('rt'), hnum('rb'), hnum('bps')
local known = redis.call('HGET', agg, 'rk') == '1'
if rt == 0 or done < rb then
  redis.call('HSET', agg, 'rt', now_ms, 'rb', fmt(done))
elseif now - rt >= 300 then
  local inst = (done - rb) * 1000 / (now - rt)
  if known then bps = 0.6 * bps + 0.4 * inst else bps = inst end
  known = true
  redis.call('HSET', agg, 'rt', now_ms, 'rb', fmt(done), 'bps', tostring(bps), 'rk', '1')
end
local rate = 0
if known then rate = math.floor(bps + 0.5) end
local eta = 'null'
if total > 0 and done >= total then eta = '0'
elseif rate > 0 and total > 0 then eta = fmt(math.ceil((total - done) / rate)) end
local seq = next_seq()
local data = '{"upload_id":' .. upload_id_json .. ',"seq":' .. fmt(seq) .. ',"state":"uploading","bytes_done":' .. fmt(done)
  .. ',"bytes_total":' .. fmt(total) .. ',"chunks_done":' .. fmt(chunks) .. ',"chunk_count":' .. fmt(hnum('count'))
  .. ',"rate_bps":' .. fmt(rate) .. ',"eta_s":' .. eta .. ',"ts_ms":' .. now_ms .. '}'
return emit('progress', data, seq)
