-- Take one of ARGV[1] slots for ARGV[3] seconds under token ARGV[2]: 1, or 0 if all are held.
-- KEYS[1] the slots: token -> when it lapses.
-- Every replica reads the time from Redis, so their clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
