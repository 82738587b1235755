-- A new counter epoch: every day and month counter is rebuilt from the ledger before its
-- next use. The reservations in flight at this moment were counted in the old epoch's
-- counters and have no ledger row yet: their ids are kept (the carry set of the new epoch)
-- so that the rebuild of a counter takes them in (init_calendar.lua).
--
-- KEYS[1] counter epoch   KEYS[2] reservation expiry index (zset)
-- ARGV[1] the new epoch   ARGV[2] carry set key prefix   ARGV[3] its life (s)
-- Reply: the number of reservations carried.

redis.call('SET', KEYS[1], ARGV[1])
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
if #ids > 0 then
  local carry = ARGV[2] .. ARGV[1]
  for i = 1, #ids, 1000 do
    redis.call('SADD', carry, unpack(ids, i, math.min(i + 999, #ids)))
  end
  redis.call('EXPIRE', carry, ARGV[3])
end
return #ids
