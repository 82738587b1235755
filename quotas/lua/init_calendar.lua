-- Create calendar counters rebuilt from the ledger, unless another worker already did.
-- KEYS[i] a calendar hash; ARGV: generation token, then 4 per key: requests, tokens,
-- micro-USD, ttl seconds. Reply: number of hashes created.
local created = 0
for i = 1, #KEYS do
  local b = 1 + (i - 1) * 4
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'g', ARGV[1], 'r', ARGV[b + 1], 't', ARGV[b + 2], 'c', ARGV[b + 3])
    redis.call('EXPIRE', KEYS[i], ARGV[b + 4])
    created = created + 1
  end
end
return created
