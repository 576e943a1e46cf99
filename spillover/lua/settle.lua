-- Markers of deliveries that are no longer in doubt: their rows are gone from the outbox
-- (or never existed: a direct write whose reply came back). Each keeps living only until
-- every request that may carry it is past its deadline: window_ms from now (0: at once).
--
-- ARGV: marker_prefix, legacy_prefix, window_ms, then job_id, delivery, job_id, delivery, ...
-- (delivery '' = a row with no delivery id: written by a release before 0.4, whose requests
-- carry no deadline, so its job-id key keeps living for the backstop, as that release set it).
-- Returns how many markers were found.

local marker_prefix, legacy_prefix, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
local found = 0

local function settle(key)
  if window > 0 then found = found + redis.call('PEXPIRE', key, window)
  else found = found + redis.call('DEL', key) end
end

for n = 4, #ARGV, 2 do
  local job_id, delivery = ARGV[n], ARGV[n + 1]
  local legacy = legacy_prefix .. job_id
  if delivery ~= '' then
    settle(marker_prefix .. delivery)
    if redis.call('GET', legacy) == delivery then settle(legacy) end
  end
end
return found
