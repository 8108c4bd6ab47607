-- Hold slot ARGV[1] ARGV[2] seconds longer if it is still held (never take it again).
-- KEYS[1] the slots: token -> when it lapses.
-- Every replica reads the time from Redis, so their clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 1
