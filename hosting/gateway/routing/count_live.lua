-- How many members have not lapsed: slots held, or sandboxes counted for a tenant.
-- KEYS[1] member -> when it lapses ('inf': never).
-- Every replica reads the time from Redis, so their clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
