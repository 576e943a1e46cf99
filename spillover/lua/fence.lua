-- Raise a queue's fence to a new lease holder's epoch: from then on only its batches are taken.
--
-- Epochs are handed out by the outbox, one per holding of the lease, each above the last. A raise
-- at or below the fence Redis has comes from an older holding (or from epochs the outbox lost,
-- a lease row deleted by an older release): it is refused, and the holder, if the outbox says it
-- still holds the lease, takes an epoch above the fence there and raises again.
-- ARGV: fence_key, epoch, ttl_ms (the marker backstop: each accepted push extends it; a holder
-- that finds it gone raises it again). Returns {1, epoch} when raised, {0, the fence} when refused.

local current = tonumber(redis.call('GET', ARGV[1]) or '0')
local epoch = tonumber(ARGV[2])
if epoch <= current then return {0, current} end
redis.call('SET', ARGV[1], epoch, 'PX', ARGV[3])
return {1, epoch}
