-- Standing: what each quota window holds, read only (GET /api/v1/quota, rate-limit headers).
--
-- KEYS[i] a quota's counter key   ARGV[1] now (epoch seconds)
-- ARGV[i + 1] how to read KEYS[i]: "lease" (live leases: those expiring after now),
-- "sliding" (every sub-bucket), or a calendar hash's field (r, t or c).
-- Reply: one element per key: a count, the sub-buckets as a flat field/value list, or the
-- field's value (nil when the hash or the field does not exist).

local now = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  local how = ARGV[i + 1]
  if how == 'lease' then
    out[i] = redis.call('ZCOUNT', key, now, '+inf')
  elseif how == 'sliding' then
    out[i] = redis.call('HGETALL', key)
  else
    out[i] = redis.call('HGET', key, how)
  end
end
return out
