-- Stores an event as the latest of its channel (unless its seq is stale) and
-- publishes it to the other hubs. Returns 1, or 0 when the seq is stale.
-- KEYS[1]: the channel's latest-event hash.
-- ARGV (named below, in this order; `scripts.rs` passes them):
local events_channel, origin, event, data, seq, ttl, sharded, exclude, transient = unpack(ARGV)
if transient == '1' then
  -- published on an upload channel: delivered, never kept as latest
elseif seq ~= '' then
  local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0') or 0
  if tonumber(seq) <= top then return 0 end
  redis.call('HSET', KEYS[1], 'top', seq, 'seq', seq, 'event', event, 'data', data)
else
  redis.call('HSET', KEYS[1], 'seq', '', 'event', event, 'data', data)
end
if transient ~= '1' then redis.call('EXPIRE', KEYS[1], tonumber(ttl)) end
local msg = origin .. '\n' .. seq .. '\n' .. exclude .. '\n' .. event .. '\n' .. data
if sharded == '1' then redis.call('SPUBLISH', events_channel, msg) else redis.call('PUBLISH', events_channel, msg) end
return 1
