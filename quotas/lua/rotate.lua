-- A new counter epoch: every day and month counter is rebuilt from the ledger before its
-- next use. The reservations in flight at this moment were counted in the old epoch's
-- counters and have no ledger row yet: their ids are kept (the carry set of the new epoch)
-- so that the rebuild of a counter takes them in (init_calendar.lua). So are those settled
-- in the last few seconds (settle.lua keeps them that long): their ledger rows may not be
-- committed yet either.
--
-- KEYS[1] counter epoch   KEYS[2] reservation expiry index (zset)
-- ARGV[1] the new epoch   ARGV[2] carry set key prefix   ARGV[3] its life (s)
-- ARGV[4] the key prefix of the sets of requests settled in each second, ARGV[5] how long
-- (s) settle.lua keeps them
-- Reply: the number of reservations carried.

redis.call('SET', KEYS[1], ARGV[1])
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local now = tonumber(redis.call('TIME')[1])
for second = now - tonumber(ARGV[5]) - 1, now do
  for _, rid in ipairs(redis.call('SMEMBERS', ARGV[4] .. second)) do
    table.insert(ids, rid)
  end
end
if #ids > 0 then
  local carry = ARGV[2] .. ARGV[1]
  for i = 1, #ids, 1000 do
    redis.call('SADD', carry, unpack(ids, i, math.min(i + 999, #ids)))
  end
  redis.call('EXPIRE', carry, ARGV[3])
end
return #ids
