-- Settlement: replace a reservation by the actual usage, or refund it; idempotent.
--
-- KEYS[1] the reservation   KEYS[2] reservation expiry index   KEYS[3] counter epoch
-- ARGV[1] request id   ARGV[2] "settle" or "refund"
-- ARGV[3] actual tokens   ARGV[4] actual cost (micro-USD)
--
-- The deltas go to the very buckets and calendar hashes the reservation was made in. A
-- settled request still counts as a request; a refund takes back the request too. A
-- calendar hash rebuilt from the ledger since admission did not see the reservation (the
-- request's ledger row is written at settlement): it gets the full actual usage, and a
-- refund leaves it alone. That is the case when its generation `g` changed, and when the
-- counter epoch was rotated since admission (Redis back from an outage, rebuild_counters):
-- the usage then goes to the day and month hashes of the current epoch, if they exist yet
-- (if not, they will be rebuilt from the ledger, this request's row included). A
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

local epoch = redis.call('GET', KEYS[3])
local moved = res.e and epoch and res.e ~= epoch

for _, op in ipairs(res.ops) do
  if op.k == 'cal' then
    local key = op.key
    if moved then  -- ":<epoch>:" sits between the counter and the day or month
      local at = string.find(key, ':' .. res.e .. ':', 1, true)
      if at then key = string.sub(key, 1, at) .. epoch .. string.sub(key, at + 1 + #res.e) end
    end
    if redis.call('EXISTS', key) == 1 then
      local fresh = swept or key ~= op.key or (redis.call('HGET', key, 'g') ~= op.g)
      if not (fresh and refund) then
        apply(key, 'r', 1, act_r, fresh)
        apply(key, 't', res.t, act_t, fresh)
        apply(key, 'c', res.c, act_c, fresh)
      end
    end
  elseif op.k == 'l' then
    redis.call('ZREM', op.key, rid)
  elseif redis.call('EXISTS', op.key) == 1 then
    if op.k == 't' then
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
