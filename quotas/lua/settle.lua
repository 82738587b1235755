-- Settlement: replace a reservation by the actual usage, or refund it; idempotent.
--
-- KEYS[1] the reservation   KEYS[2] reservation expiry index   KEYS[3] counter epoch
-- ARGV[1] request id   ARGV[2] "settle" or "refund"
-- ARGV[3] actual tokens   ARGV[4] actual cost (micro-USD)
--
-- The deltas go to the very buckets and calendar hashes the reservation was made in. A
-- settled request still counts as a request; a refund takes back the request too. Day and
-- month usage goes to the hashes of the current counter epoch: after a rotation (Redis back
-- from an outage, rebuild_counters) to the same counter's hash of the new epoch, if it
-- exists yet (if not, it will be rebuilt from the ledger, this request's row included). A
-- hash rebuilt from the ledger since admission that did not take the reservation in
-- (init_calendar.lua does, for those in flight at the rotation) gets the full actual usage,
-- and a refund leaves it alone: that is the case when its generation `g` is not the one the
-- reservation names, or it is another epoch's. A reservation already refunded by the sweep
-- (its worker was presumed dead) gets the full actual usage back. Reply: 1 settled now, 0
-- nothing to do (settled before).
--
-- ARGV[5] the key prefix of the sets of requests settled in each second, ARGV[6] how long
-- (s) a settled request is kept. A settled request's reservation stays that long, marked
-- settled (`d`), holding its actual usage and its calendar ops, and its id in the set of
-- its second: its ledger INSERT runs while this script does, and a rotation meanwhile
-- (rotate.lua carries those ids too) must not rebuild a counter from a ledger without
-- its row and without it. init_calendar.lua takes it in unless the ledger's sums hold
-- its row; nothing settles or renews it again.

local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local res = cjson.decode(raw)
if res.d then return 0 end
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
local kept = {}  -- its calendar ops, for the rebuilds of the next few seconds

for _, op in ipairs(res.ops) do
  if op.x then
    -- A rebuild counted this request through its ledger row (init_calendar.lua).
  elseif op.k == 'cal' then
    local key = op.key
    -- "<prefix>:{<counter>}:<epoch>:<d|m><period>": this epoch's hash of that counter.
    if epoch and not string.find(key, ':' .. epoch .. ':', 1, true) then
      local base, period = string.match(key, '^(.*}):%x+:([dm]%d+)$')
      if base then key = base .. ':' .. epoch .. ':' .. period end
    end
    table.insert(kept, op)
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
redis.call('ZREM', KEYS[2], rid)
if refund or #kept == 0 then
  redis.call('DEL', KEYS[1])
else
  local keep = tonumber(ARGV[6])
  res.ops, res.t, res.c, res.s, res.d = kept, act_t, act_c, nil, 1
  redis.call('SET', KEYS[1], cjson.encode(res), 'EX', keep)
  local second = ARGV[5] .. redis.call('TIME')[1]
  redis.call('SADD', second, rid)
  redis.call('EXPIRE', second, keep + 1)
end
return 1
