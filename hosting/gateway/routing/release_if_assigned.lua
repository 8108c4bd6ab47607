-- Detach a sandbox from its route if it is still the one assigned, and uncount it for the tenant.
-- KEYS[1] the route's hash; ARGV[1] the sandbox id, ARGV[2] the prefix of the tenants' sandbox
-- counts, ARGV[3] the session id.
-- The count's key is built here from the route's tenant: fine on one Redis server, not on Redis Cluster.
if redis.call('HGET', KEYS[1], 'sandbox_id') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'sandbox_id', 'address', 'token', 'pid')
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if tenant then redis.call('ZREM', ARGV[2] .. tenant, ARGV[3]) end
return 1
