-- Replay a batch of outbox rows into RQ, atomically per row and idempotently.
--
-- For each row: if its delivery marker exists the job is already in Redis (an
-- earlier replay whose outbox commit was lost, or a direct enqueue whose reply
-- was lost): write nothing. Otherwise write what RQ's enqueue would write and
-- set the marker LAST, so a row that fails half-way is simply written again.
--
-- ARGV: queue_key, queues_set, job_prefix, scheduled_key, deferred_key,
--       marker_prefix, marker_ttl, rows.
-- rows is one MessagePack array with, per row, the array
--       {job_id, at_front (0/1), scheduled_at ('' = now), job hash}
-- and the job hash is itself the MessagePack array (field, value, ...) that
-- the producer stored in the outbox. The replayer splices the stored bytes in
-- without decoding them, and cmsgpack unpacks the whole batch in one C call.
-- Returns {codes, error}: a string with one digit per processed row
-- (0 duplicate, 1 queued, 2 deferred, 3 scheduled); processing stops at the
-- first failing row, whose error text is the second element.

local queue_key, queues_set, job_prefix = ARGV[1], ARGV[2], ARGV[3]
local scheduled_key, deferred_key = ARGV[4], ARGV[5]
local marker_prefix, marker_ttl = ARGV[6], ARGV[7]
local rows = cmsgpack.unpack(ARGV[8])
local codes = {}

local function write(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then error(reply.err, 0) end
  return reply
end

-- RQ defers a job while any parent exists and is not finished.
local function must_defer(deps)
  for _, dep in ipairs(deps) do
    local status = redis.call('HGET', job_prefix .. dep, 'status')
    if redis.call('EXISTS', job_prefix .. dep) == 1 and status ~= 'finished' then return true end
  end
  return false
end

local function replay_row(job_id, at_front, scheduled_at, fields)
  local ttl, deps = '', {}
  for f = 1, #fields, 2 do
    if fields[f] == 'ttl' then ttl = fields[f + 1]
    elseif fields[f] == 'dependency_ids' then deps = cjson.decode(fields[f + 1]) end
  end
  local job_key = job_prefix .. job_id
  local marker = marker_prefix .. job_id
  if redis.call('EXISTS', marker) == 1 then return 0 end

  local code = 1
  if scheduled_at ~= '' then code = 3 elseif #deps > 0 and must_defer(deps) then code = 2 end

  if code == 2 then
    -- RQ saves a deferred job with status 'deferred' and no enqueued_at.
    local hash = {}
    for f = 1, #fields, 2 do
      local name = fields[f]
      if name ~= 'enqueued_at' then
        hash[#hash + 1] = name
        hash[#hash + 1] = (name == 'status') and 'deferred' or fields[f + 1]
      end
    end
    fields = hash
  end
  write('HSET', job_key, unpack(fields))
  if code == 2 then
    write('ZADD', deferred_key, redis.call('TIME')[1], job_id)
    for _, dep in ipairs(deps) do
      write('SADD', job_prefix .. dep .. ':dependents', job_id)
      write('SADD', job_prefix .. ':' .. job_id .. ':dependencies', dep)
    end
  end
  if ttl ~= '' and tonumber(ttl) > 0 then
    write('EXPIRE', job_key, ttl)
    write('EXPIRE', job_prefix .. job_id .. ':dependents', ttl)
    write('EXPIRE', job_prefix .. ':' .. job_id .. ':dependencies', ttl)
  end
  if code == 3 then
    write('ZADD', scheduled_key, scheduled_at, job_id)
  elseif code == 1 then
    write(at_front == '1' and 'LPUSH' or 'RPUSH', queue_key, job_id)
  end
  write('SET', marker, '1', 'EX', marker_ttl)
  return code
end

-- RQ registers the queue with every enqueue; once per batch is the same set.
local registered, failure = pcall(write, 'SADD', queues_set, queue_key)
if not registered then return {'', tostring(failure)} end

for n, row in ipairs(rows) do
  local ok, result = pcall(replay_row, row[1], row[2], row[3], row[4])
  if not ok then return {table.concat(codes), tostring(result)} end
  codes[n] = result
end
return {table.concat(codes)}
