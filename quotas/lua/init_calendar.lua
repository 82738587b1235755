-- Create calendar counters rebuilt from the ledger, unless another worker already did,
-- and take in the reservations still in flight that were counted in the same counter of
-- an older epoch (the carry set, rotate.lua): the ledger has no row of theirs yet. Each
-- such reservation is added to the new counter and its settlement pointed at it, so that
-- it settles there as any other (the difference between actual and reserved).
--
-- A carried reservation whose request already has its ledger row (its settlement reached
-- PostgreSQL, not Redis: deferred; or a request Redis admitted after its worker gave up
-- waiting and served it in fail-open) is counted through that row: its op is marked `x`,
-- and neither its settlement nor the sweep touches the new counter for it.
--
-- KEYS[i] a calendar hash (i <= n), KEYS[n + 1] the carry set of the hashes' epoch (the
-- one the rebuild read, whatever the current epoch is now)
-- ARGV[1] generation token, then 4 per key: requests, tokens, micro-USD, ttl seconds;
-- ARGV[2 + 4n] the reservation key prefix, then the request ids of carried reservations
-- whose ledger rows the rebuild counted.
-- Reply: number of hashes created.
--
-- A calendar key is "<prefix>:{<counter>}:<epoch>:<d|m><period>": the same counter and
-- period in any epoch share what is left without the epoch.

local function identity(key)
  local base, period = string.match(key, '^(.*}):%x+:([dm]%d+)$')
  if not base then return nil end
  return base .. ':' .. period
end

local n = #KEYS - 1
local gen = ARGV[1]
local created = {}
local count = 0
for i = 1, n do
  local b = 1 + (i - 1) * 4
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'g', gen, 'r', ARGV[b + 1], 't', ARGV[b + 2], 'c', ARGV[b + 3])
    redis.call('EXPIRE', KEYS[i], ARGV[b + 4])
    count = count + 1
    local id = identity(KEYS[i])
    if id then created[id] = KEYS[i] end
  end
end
if count == 0 then return 0 end

local carry = KEYS[n + 1]
local prefix = ARGV[2 + 4 * n]
local in_ledger = {}
for i = 3 + 4 * n, #ARGV do in_ledger[ARGV[i]] = true end
for _, rid in ipairs(redis.call('SMEMBERS', carry)) do
  local rkey = prefix .. rid
  local raw = redis.call('GET', rkey)
  if not raw then
    redis.call('SREM', carry, rid)  -- settled, or refunded: nothing left to carry
  else
    local res = cjson.decode(raw)
    -- One the sweep refunded is charged in full when it settles; one settled already
    -- (`d`, settle.lua) holds its actual usage in place of its reservation.
    if not res.s then
      local changed = false
      for _, op in ipairs(res.ops) do
        if op.k == 'cal' and op.g ~= gen then
          local target = created[identity(op.key) or '']
          if target then
            if in_ledger[rid] then
              op.x = 1
            else
              redis.call('HINCRBY', target, 'r', 1)
              if res.t ~= 0 then redis.call('HINCRBY', target, 't', res.t) end
              if res.c ~= 0 then redis.call('HINCRBY', target, 'c', res.c) end
            end
            op.key, op.g = target, gen
            changed = true
          end
        end
      end
      if changed then redis.call('SET', rkey, cjson.encode(res), 'KEEPTTL') end
    end
  end
end
return count
