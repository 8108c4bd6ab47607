-- Move a route keyed by the session id alone (written before ids were per tenant) under
-- its tenant's key; the new key, or false if there was nothing to move (a route already
-- under the tenant's key wins: the old one is dropped).
-- KEYS[1] the old route's hash, KEYS[2] the index of routes; ARGV[1] the prefix of route
-- hashes, ARGV[2] the session id.
local tenant = redis.call('HGET', KEYS[1], 'tenant')
redis.call('SREM', KEYS[2], ARGV[2])
if not tenant then return false end
local key = tenant .. '/' .. ARGV[2]
if redis.call('EXISTS', ARGV[1] .. key) == 1 then redis.call('DEL', KEYS[1]) return false end
redis.call('RENAME', KEYS[1], ARGV[1] .. key)
redis.call('SADD', KEYS[2], key)
return key
