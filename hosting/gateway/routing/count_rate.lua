-- How many events were counted in the last ARGV[1] seconds.
-- KEYS[1] the window: token -> when it was counted.
-- Every replica reads the time from Redis, so their clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')
