-- Stamp a route's activity if it exists; the sandbox it has now (a relay learns its session moved).
-- KEYS[1] the route's hash; ARGV[1] the time now.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'last_activity', ARGV[1])
return redis.call('HGET', KEYS[1], 'sandbox_id')
