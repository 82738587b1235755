-- Standing: what each quota window holds, read only (GET /api/v1/quota, rate-limit headers).
--
-- KEYS[1] policy version   KEYS[2] counter epoch   KEYS[2 + i] a quota's counter key
-- ARGV[1] now (epoch seconds)   ARGV[2] expected policy version   ARGV[3] expected epoch
-- ARGV[3 + i] how to read KEYS[2 + i]: "lease" (live leases: those expiring after now), a
-- calendar hash's field (r, t or c), or the length in seconds of a sliding window.
-- Reply: {"stale", version, epoch} when the caller's policy or epoch is old (as admit.lua);
-- {"rebuild", i, j, ...} when calendar counters of this epoch are still to be rebuilt from
-- the ledger; else {"ok", ...} with one element per counter: the count of live leases; the
-- field's value; or, for a sliding window, {used, first} where `used` sums the sub-buckets
-- still in the window and `first` is the oldest of them that holds anything (0 when none
-- does), from which the window's reset follows. A version or epoch not set yet (Redis
-- emptied, no admission since) is not compared.

local SUB = 12  -- sub-buckets per sliding window, as in admit.lua
local now = tonumber(ARGV[1])
local version = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if version and epoch and (version ~= ARGV[2] or epoch ~= ARGV[3]) then
  return {'stale', version, epoch}
end
local out = {'ok'}
local missing = {'rebuild'}
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  local how = ARGV[3 + i]
  if how == 'lease' then
    -- Exclusive, as admit.lua drops a lease whose expiry has come (ZREMRANGEBYSCORE -inf now).
    out[i + 1] = redis.call('ZCOUNT', key, '(' .. ARGV[1], '+inf')
  elseif how == 'r' or how == 't' or how == 'c' then
    local v = redis.call('HMGET', key, 'g', how)
    if not v[1] then missing[#missing + 1] = i end
    out[i + 1] = v[2] or 0
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
    out[i + 1] = {used, first}
  end
end
if #missing > 1 then return missing end
return out
