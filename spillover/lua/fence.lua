-- Raise a queue's fence for its new lease holder; the token it must then carry.
--
-- The token is above both the fence Redis has and the epoch the outbox gave the lease, so it
-- only grows, whichever of the two forgot (a lease row deleted, a Redis restarted empty).
-- ARGV: fence_key, epoch, ttl_ms (the fence outlives its holder's lease; it is re-raised
-- by every new holder).

local current = tonumber(redis.call('GET', ARGV[1]) or '0')
local token = math.max(current + 1, tonumber(ARGV[2]))
redis.call('SET', ARGV[1], token, 'PX', ARGV[3])
return token
