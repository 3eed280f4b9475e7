-- After an outage: drops the stream fields of one hub from an upload
-- aggregation; `finished` = '1' marks the upload finished.
-- KEYS[1]: the upload's aggregation hash.
local stream_prefix, finished, ttl = unpack(ARGV)
local all = redis.call('HKEYS', KEYS[1])
for _, k in ipairs(all) do
  if string.sub(k, 1, #stream_prefix) == stream_prefix then redis.call('HDEL', KEYS[1], k) end
end
if finished == '1' then
  redis.call('HSET', KEYS[1], 'fin', '1')
  redis.call('EXPIRE', KEYS[1], tonumber(ttl))
end
return 1
