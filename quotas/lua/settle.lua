-- Settlement: replace a reservation by the actual usage, or refund it; idempotent.
--
-- KEYS[1] the reservation   KEYS[2] reservation expiry index
-- ARGV[1] request id   ARGV[2] "settle" or "refund"
-- ARGV[3] actual tokens   ARGV[4] actual cost (micro-USD)
--
-- The deltas go to the very buckets and calendar hashes the reservation was made in. A
-- settled request still counts as a request; a refund takes back the request too. A
-- calendar hash rebuilt from the ledger since admission (its generation `g` changed) did not
-- see the reservation: it gets the full actual usage, and a refund leaves it alone. A
-- reservation already refunded by the sweep (its worker was presumed dead) gets the full
-- actual usage back. Reply: 1 settled now, 0 nothing to do (settled before).

local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local res = cjson.decode(raw)
local rid = ARGV[1]
local refund = ARGV[2] == 'refund'
local act_t = tonumber(ARGV[3])
local act_c = tonumber(ARGV[4])
local swept = res.s ~= nil
if refund then act_t, act_c = 0, 0 end
local act_r = 1
if refund then act_r = 0 end

local function apply(key, field, reserved, actual, fresh)
  local delta = actual - reserved
  if fresh then delta = actual end
  if delta ~= 0 then redis.call('HINCRBY', key, field, delta) end
end

for _, op in ipairs(res.ops) do
  if op.k == 'l' then
    redis.call('ZREM', op.key, rid)
  elseif redis.call('EXISTS', op.key) == 1 then
    if op.k == 'cal' then
      local fresh = swept or (redis.call('HGET', op.key, 'g') ~= op.g)
      if not (fresh and refund) then
        apply(op.key, 'r', 1, act_r, fresh)
        apply(op.key, 't', res.t, act_t, fresh)
        apply(op.key, 'c', res.c, act_c, fresh)
      end
    elseif op.k == 't' then
      apply(op.key, op.f, res.t, act_t, swept)
    elseif op.k == 'c' then
      apply(op.key, op.f, res.c, act_c, swept)
    else
      apply(op.key, op.f, 1, act_r, swept)
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], rid)
return 1
