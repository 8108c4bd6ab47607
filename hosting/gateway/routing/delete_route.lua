-- Delete a route, its entry in the index and its sandbox's count for the tenant.
-- KEYS[1] the route's hash, KEYS[2] the index of routes; ARGV[1] the prefix of the tenants'
-- sandbox counts, ARGV[2] the route's key, ARGV[3] the session id.
-- The count's key is built here from the route's tenant: fine on one Redis server, not on Redis Cluster.
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if tenant then redis.call('ZREM', ARGV[1] .. tenant, ARGV[3]) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
