-- Count a sandbox about to be provisioned for session ARGV[1] for ARGV[3] seconds, unless
-- the tenant has ARGV[2] counted already: 1 if the session is counted now, else 0. A session
-- whose route has a sandbox is counted for good ('inf') and stays so.
-- KEYS[1] the tenant's sandboxes: session -> when its reservation lapses.
-- Every replica reads the time from Redis, so their clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score == 'inf' then return 1 end
if (not score) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1
