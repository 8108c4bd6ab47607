-- Remove and return one pooled sandbox's entry (false: the pool is empty); each goes to one caller.
-- KEYS[1] the pool: sandbox id -> entry.
local ids = redis.call('HKEYS', KEYS[1])
if #ids == 0 then return false end
local entry = redis.call('HGET', KEYS[1], ids[1])
redis.call('HDEL', KEYS[1], ids[1])
return entry
