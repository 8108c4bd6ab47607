-- Count a route's sandbox for its tenant, if it has one (routes written before the counts).
-- KEYS[1] the route's hash; ARGV[1] the prefix of the tenants' sandbox counts, ARGV[2] the session id.
-- The count's key is built here from the route's tenant: fine on one Redis server, not on Redis Cluster.
local found = redis.call('HMGET', KEYS[1], 'tenant', 'sandbox_id')
if found[1] and found[2] then
  redis.call('ZADD', ARGV[1] .. found[1], 'inf', ARGV[2])
  return 1
end
return 0
