-- Standing: what each quota window holds, read only (GET /api/v1/quota, rate-limit headers).
--
-- KEYS[i] a quota's counter key   ARGV[1] now (epoch seconds)
-- ARGV[i + 1] how to read KEYS[i]: "lease" (live leases: those expiring after now), a
-- calendar hash's field (r, t or c), or the length in seconds of a sliding window.
-- Reply: one element per key: the count of live leases; the field's value (nil when the
-- hash or the field does not exist); or, for a sliding window, {used, first} where `used`
-- sums the sub-buckets still in the window and `first` is the oldest of them that holds
-- anything (0 when none does), from which the window's reset follows.

local SUB = 12  -- sub-buckets per sliding window, as in admit.lua
local now = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local how = ARGV[i + 1]
  if how == 'lease' then
    out[i] = redis.call('ZCOUNT', key, ARGV[1], '+inf')
  elseif how == 'r' or how == 't' or how == 'c' then
    out[i] = redis.call('HGET', key, how)
  else
    local oldest = math.floor(now / (tonumber(how) / SUB)) - SUB
    local flat = redis.call('HGETALL', key)
    local used, first = 0, 0
    for j = 1, #flat, 2 do
      local idx = tonumber(flat[j])
      local c = tonumber(flat[j + 1])
      if idx >= oldest then
        used = used + c
        if c > 0 and (first == 0 or idx < first) then first = idx end
      end
    end
    out[i] = {used, first}
  end
end
return out
