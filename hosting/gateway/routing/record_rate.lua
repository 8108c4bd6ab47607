-- Count event ARGV[2] now, whatever the count (a measure of demand, not a limit); it
-- leaves the window after ARGV[1] seconds.
-- KEYS[1] the window: token -> when it was counted.
-- Every replica reads the time from Redis, so their clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
return 1
