-- Renewal: a request still running (a long stream) keeps its reservation and its leases
-- for another lease's life, so that the sweep does not refund them under it.
--
-- KEYS[1] the reservation   KEYS[2] reservation expiry index
-- ARGV[1] request id   ARGV[2] now (s)   ARGV[3] lease ttl (s)
-- Reply: 1 renewed, 0 nothing to renew (settled, swept, or lost with a restarted Redis).

local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local res = cjson.decode(raw)
if res.s or res.d then return 0 end  -- swept, or settled (settle.lua)
local rid = ARGV[1]
local ttl = tonumber(ARGV[3])
local until_ = tonumber(ARGV[2]) + ttl
for _, op in ipairs(res.ops) do
  if op.k == 'l' and redis.call('ZADD', op.key, 'XX', 'CH', until_, rid) == 1 then
    redis.call('EXPIRE', op.key, ttl * 2)
  end
end
redis.call('ZADD', KEYS[2], 'XX', until_, rid)
-- The reservation lives two leases from now at least; not less than admit.lua gave it
-- (as long as its counters count it, for its refund however late the sweep).
if redis.call('TTL', KEYS[1]) < ttl * 2 then redis.call('EXPIRE', KEYS[1], ttl * 2) end
return 1
