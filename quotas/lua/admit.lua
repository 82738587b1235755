-- Admission: check every window of every scope, then reserve all or nothing.
--
-- KEYS[1] policy version   KEYS[2] counter epoch   KEYS[3] reservation of this request
-- KEYS[4] reservation expiry index (zset)          KEYS[5] today's refusal counts (hash)
-- KEYS[5+i] the counter of quota i
-- ARGV[1] now (s, float)   ARGV[2] request id   ARGV[3] expected policy version
-- ARGV[4] expected epoch   ARGV[5] fresh token (used if version/epoch are missing)
-- ARGV[6] lease ttl (s)    ARGV[7] mode: "full" (reserve) or "hit" (count requests only)
-- ARGV[8] estimated tokens ARGV[9] estimated cost (micro-USD)
-- ARGV[10] seconds to the end of the UTC day   ARGV[11] ... of the UTC month
-- ARGV[12] number of quotas, then 5 per quota: scope, dimension, limit, kind, window
--   kind: r requests, t tokens, c micro-USD, l concurrency lease
--   window: seconds of a sliding window, "day"/"month" (calendar hash), "lease" (zset)
--
-- Sliding windows are hashes of SUB buckets (field = bucket index). The count of a window
-- is the sum of every bucket that overlaps the last `window` seconds, so no window of that
-- length ever holds more than the limit; the price is that a request may be refused up to
-- one bucket (window / SUB) early.
--
-- Optional cache gate (a cache miss's look-up in the same round trip as its admission):
-- KEYS[6+n] the answer's cache entry ("<fresh_until> <stale_until>\n<body>", see
-- caching/tier.py)   KEYS[7+n] its single-flight lock
-- ARGV[13+5n] lock token   ARGV[14+5n] lock ttl (ms; 0: take no lock)
-- A fresh entry turns a "full" admission into a "hit": only the request windows are
-- checked and counted. A full admission that is let through takes the lock (SET NX).
--
-- Replies: {"ok", n, used_1, reset_1, ...}            admitted (used includes this request)
--          {"deny", i, retry_after, n, used_1, reset_1, ...}
--          {"stale", version, epoch}                 the caller's policy or epoch is old
--          {"rebuild", i, j, ...}                    calendar counters to rebuild from the ledger
-- With a gate, "ok" and "deny" end with: the entry (fresh or stale; false if none), 1 if
-- the lock was taken, the mode that was applied ("full" or "hit"). In "hit" mode the
-- token windows are read for the reply (the response's headers) but neither checked nor
-- counted; the other windows are reported as 0 and untouched.

local SUB = 12
local now = tonumber(ARGV[1])
local rid = ARGV[2]

local version = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if not version then version = ARGV[5]; redis.call('SET', KEYS[1], version) end
if not epoch then epoch = ARGV[5]; redis.call('SET', KEYS[2], epoch) end
if version ~= ARGV[3] or epoch ~= ARGV[4] then
  return {'stale', version, epoch}
end

local lease_ttl = tonumber(ARGV[6])
local mode = ARGV[7]
local est_t = tonumber(ARGV[8])
local est_c = tonumber(ARGV[9])
local day_left = tonumber(ARGV[10])
local month_left = tonumber(ARGV[11])
local n = tonumber(ARGV[12])

-- A crashed worker's reservations: refund up to a few per admission (also swept periodically).
-- However late that comes, the reservation is still there to refund: it lives as long as
-- the counters it holds an estimate in count for (see the reserve phase).
local function refund_ops(res, rid_)
  for _, op in ipairs(res.ops) do
    if op.x then
      -- counted by a rebuild through its ledger row, not as a reservation
    elseif op.k == 'l' then
      redis.call('ZREM', op.key, rid_)
    elseif redis.call('EXISTS', op.key) == 1 then
      if op.k == 'cal' then
        if redis.call('HGET', op.key, 'g') == op.g then
          redis.call('HINCRBY', op.key, 'r', -1)
          if res.t ~= 0 then redis.call('HINCRBY', op.key, 't', -res.t) end
          if res.c ~= 0 then redis.call('HINCRBY', op.key, 'c', -res.c) end
        end
      else
        local amount = 1
        if op.k == 't' then amount = res.t elseif op.k == 'c' then amount = res.c end
        if amount ~= 0 then redis.call('HINCRBY', op.key, op.f, -amount) end
      end
    end
  end
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 5)
for j = 1, #expired, 2 do
  local old = expired[j]
  local rkey = string.sub(KEYS[3], 1, #KEYS[3] - #rid) .. old
  local raw = redis.call('GET', rkey)
  if raw then
    local res = cjson.decode(raw)
    if not res.s then
      refund_ops(res, old)
      res.s = 1
      -- Kept, refunded, until two of its own leases (`l`) from its last admission or
      -- renewal, as it would have been but for its refund: a worker that was only slow and
      -- settles meanwhile is charged its actual usage in full (settle.lua), and its request
      -- id stays in use until then (a job's item waits for it: generation/jobs.py). Past
      -- that (a late sweep), it is forgotten at once.
      if not res.l then
        redis.call('SET', rkey, cjson.encode(res), 'KEEPTTL')  -- one admitted before `l`
      else
        local left = math.ceil(tonumber(expired[j + 1]) + res.l - now)
        if left > 0 then
          redis.call('SET', rkey, cjson.encode(res), 'EX', left)
        else
          redis.call('DEL', rkey)
        end
      end
    end
  end
  redis.call('ZREM', KEYS[4], old)
end

local gated = #KEYS >= 7 + n
local entry = false
if gated then
  entry = redis.call('GET', KEYS[6 + n])
  if entry and mode == 'full' then
    local fresh = tonumber(string.match(entry, '^(%S+)'))
    if fresh and now < fresh then
      mode = 'hit'
      est_t, est_c = 0, 0
    end
  end
end

if mode == 'full' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {'dup'}
end

-- In "hit" mode only the request windows count (a cached answer costs no tokens, no
-- money and holds no concurrency lease); the token windows are only read.
local function applies(kind)
  return mode ~= 'hit' or kind == 'r'
end

local function read(kind)
  return applies(kind) or kind == 't'
end

local function amount_of(kind)
  if kind == 't' then return est_t elseif kind == 'c' then return est_c end
  return 1
end

-- Check phase: read every counter, write nothing.
local missing = {}
local used = {}
local reset = {}
local worst, worst_wait = nil, -1
for i = 1, n do
  local b = 12 + (i - 1) * 5
  local limit = tonumber(ARGV[b + 3])
  local kind, window = ARGV[b + 4], ARGV[b + 5]
  local key = KEYS[5 + i]
  local amount = applies(kind) and amount_of(kind) or 0
  local u, wait, rst = 0, 0, 0
  if not read(kind) then
    -- skipped: reported as 0, never refused
  elseif window == 'day' or window == 'month' then
    local v = redis.call('HMGET', key, 'g', kind)
    if not v[1] then
      if applies(kind) then missing[#missing + 1] = i end
    else
      u = tonumber(v[2] or '0')
    end
    rst = (window == 'day') and day_left or month_left
    wait = rst
  elseif window == 'lease' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    u = redis.call('ZCARD', key)
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then rst = tonumber(first[2]) - now else rst = 0 end
    -- A lease is freed when its request settles, usually well before it expires.
    wait = 1
  else
    local w = tonumber(window)
    local size = w / SUB
    local cur = math.floor(now / size)
    local oldest = cur - SUB
    local flat = redis.call('HGETALL', key)
    local buckets = {}
    for j = 1, #flat, 2 do
      local idx = tonumber(flat[j])
      if idx >= oldest then
        local c = tonumber(flat[j + 1])
        u = u + c
        buckets[#buckets + 1] = {idx, c}
      end
    end
    table.sort(buckets, function(a, c) return a[1] < c[1] end)
    -- Time until enough buckets leave the window for this request to fit.
    local need = u + amount - limit
    wait = w
    rst = 0
    local freed = 0
    for _, bc in ipairs(buckets) do
      if bc[2] > 0 and rst == 0 then rst = (bc[1] + SUB + 1) * size - now end
      freed = freed + bc[2]
      if need > 0 and freed >= need then
        wait = (bc[1] + SUB + 1) * size - now
        need = 0
      end
    end
    if amount > limit then wait = w end
  end
  used[i] = u
  reset[i] = rst
  -- A limit of 0 refuses everything, a request that would add nothing (a free model's
  -- cost) included.
  local over = u + amount > limit or limit <= 0
  if #missing == 0 and applies(kind) and over and wait > worst_wait then
    worst, worst_wait = i, wait
  end
end

if #missing > 0 then
  local reply = {'rebuild'}
  for _, i in ipairs(missing) do reply[#reply + 1] = i end
  return reply
end

local function summary(first)
  local reply = first
  reply[#reply + 1] = n
  for i = 1, n do
    reply[#reply + 1] = used[i]
    reply[#reply + 1] = tostring(reset[i])
  end
  return reply
end

local function gate_tail(reply, claimed)
  if gated then
    reply[#reply + 1] = entry
    reply[#reply + 1] = claimed
    reply[#reply + 1] = mode
  end
  return reply
end

if worst then
  local b = 12 + (worst - 1) * 5
  redis.call('HINCRBY', KEYS[5], ARGV[b + 1] .. '|' .. ARGV[b + 2], 1)
  redis.call('EXPIRE', KEYS[5], 3 * 86400)
  return gate_tail(summary({'deny', worst, tostring(worst_wait)}), 0)
end

-- Reserve phase: all or nothing (nothing above wrote a counter).
-- `life`: how long the reservation must be kept for its refund, should its worker die: as
-- long as any counter it adds to counts it (to its day's or month's end, after which no
-- admission reads that counter; the sliding hash's life; two leases at least), so that
-- however late the next sweep or admission comes (a quiet night with no periodic sweep),
-- the estimate is taken back, never kept for good. Only those in flight live that long: a
-- settled one is kept a few seconds (settle.lua), a refunded one as described above.
local ops = {}
local seen = {}
local life = lease_ttl * 2
for i = 1, n do
  local b = 12 + (i - 1) * 5
  local kind, window = ARGV[b + 4], ARGV[b + 5]
  local key = KEYS[5 + i]
  local amount = amount_of(kind)
  if not applies(kind) then
    amount = 0
  elseif window == 'lease' then
    redis.call('ZADD', key, now + lease_ttl, rid)
    redis.call('EXPIRE', key, lease_ttl * 2)
    ops[#ops + 1] = {key = key, k = 'l'}
  elseif window == 'day' or window == 'month' then
    -- A calendar hash tracks requests, tokens and cost together, so that a limit added
    -- later on another dimension starts from the truth.
    if not seen[key] then
      seen[key] = true
      redis.call('HINCRBY', key, 'r', 1)
      if est_t ~= 0 then redis.call('HINCRBY', key, 't', est_t) end
      if est_c ~= 0 then redis.call('HINCRBY', key, 'c', est_c) end
      ops[#ops + 1] = {key = key, k = 'cal', g = redis.call('HGET', key, 'g')}
    end
    life = math.max(life, (window == 'day') and day_left or month_left)
  else
    local w = tonumber(window)
    local size = w / SUB
    local cur = math.floor(now / size)
    -- The hash gains a field only when a request opens a new bucket: only then can it
    -- have grown past SUB + 2 buckets, and only then must its life be extended (it must
    -- outlive its newest bucket's time in the window).
    if amount ~= 0 and redis.call('HINCRBY', key, cur, amount) == amount then
      if redis.call('HLEN', key) > SUB + 2 then
        local fields = redis.call('HKEYS', key)
        for _, f in ipairs(fields) do
          if tonumber(f) < cur - SUB then redis.call('HDEL', key, f) end
        end
      end
      redis.call('EXPIRE', key, math.ceil(w + 2 * size))
    end
    ops[#ops + 1] = {key = key, k = kind, f = tostring(cur)}
    life = math.max(life, math.ceil(w + 2 * size))
    if reset[i] == 0 and amount ~= 0 then reset[i] = (cur + SUB + 1) * size - now end
  end
  used[i] = used[i] + amount
end

local claimed = 0
if mode == 'full' then
  local res = {t = est_t, c = est_c, e = epoch, l = lease_ttl, ops = ops}
  redis.call('SET', KEYS[3], cjson.encode(res), 'EX', life)
  redis.call('ZADD', KEYS[4], now + lease_ttl, rid)
  local b = 12 + 5 * n
  if gated and tonumber(ARGV[b + 2]) > 0 then
    if redis.call('SET', KEYS[7 + n], ARGV[b + 1], 'NX', 'PX', ARGV[b + 2]) then claimed = 1 end
  end
end
return gate_tail(summary({'ok'}), claimed)
