-- Drop session ARGV[1]'s reservation; a session whose route has a sandbox ('inf') stays counted.
-- KEYS[1] the tenant's sandboxes: session -> when its reservation lapses.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and score ~= 'inf' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
