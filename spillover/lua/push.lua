-- Push outbox rows into RQ: every write spillover makes into RQ is one call of this script.
--
-- The call as a whole is refused, writing nothing, when it arrives after its deadline
-- (Redis time, ms: a request held in the network or by a paused process) or, for a
-- replayer, when its fencing token is not the queue's current one (a newer lease holder
-- has raised it). Then, per row: if the delivery's marker exists the job is in Redis
-- already (a push whose reply or outbox delete was lost): write nothing. Otherwise write
-- what RQ's enqueue would write and set the marker LAST, so a row that fails half-way is
-- simply written again. A marker lives for the backstop until the row is gone from the
-- outbox; then the pusher shortens it to the deadline window (settle.lua).
--
-- Every key is under RQ's key prefix (KEYS[1] is the queue key again, declared so that a cluster
-- client routes the call; with a hash-tagged prefix all keys share its slot).
-- ARGV: queue_key, queues_set, job_prefix, scheduled_key, deferred_key,
--       marker_prefix, legacy_prefix, backstop_ms, deadline_ms, fence_key ('' = none),
--       fence_token, window_ms, rate_limit_prefix, rate_limit_keys, group_prefix, groups_set,
--       client time (s, RQ's scores), client time as RQ formats it (enqueued_at), rows,
--       pushed_prefix, trace_ms (> 0: the rows are replayed from an outbox; leave a trace of each push
--       that lives this long; 0: none).
-- rows is one MessagePack array with, per row, the array
--       {job_id, delivery ('' = a row of a release before 0.4), at_front (0/1),
--        scheduled_at ('' = now), job hash, options (JSON, '' = none)}
-- and the job hash is itself the MessagePack array (field, value, ...) that the producer
-- stored in the outbox: cmsgpack unpacks a whole batch in one C call. Options:
-- unique (write nothing if the job id exists: RQ's unique=True), group (add the job to
-- that RQ Group), failed_ok (a failed parent counts as done, as RQ 3's enqueue and every
-- enqueue_many decide for allow_dependency_failures), register (record the dependencies even
-- when they are met, as enqueue_many does), outbox_parents ({parent id: delivery id} of parents whose
-- rows went to an outbox: see must_defer).
-- A job hash with rate_limit_key goes through RQ 3's rate limit: it waits in the limit's
-- set and the free slots are filled, oldest first, as RQ's acquire script does.
-- Returns {codes, error, refusal, redis time ms, call, µs the rows took}: codes has one digit per processed row
-- (0 duplicate, 1 queued, 2 deferred, 3 scheduled, 4 unique id exists, 5 rate limited);
-- processing stops at the first failing row, whose error text is the second element ('1' in
-- call: the error is the batch's own, not a row's); refusal is '', 'LATE', 'FENCED' or 'UNDECODABLE'.

if redis.replicate_commands then redis.replicate_commands() end -- TIME before writes (Redis < 5)

local queue_key, queues_set, job_prefix = ARGV[1], ARGV[2], ARGV[3]
local scheduled_key, deferred_key = ARGV[4], ARGV[5]
local marker_prefix, legacy_prefix, backstop = ARGV[6], ARGV[7], ARGV[8]
local deadline, fence_key, fence_token = tonumber(ARGV[9]), ARGV[10], ARGV[11]
local window = tonumber(ARGV[12])
local rl_prefix, rl_keys, group_prefix, groups_set = ARGV[13], ARGV[14], ARGV[15], ARGV[16]
local client_s, client_stamp = ARGV[17], ARGV[18]
local pushed_prefix, trace_ms = ARGV[20], tonumber(ARGV[21])
-- Scores of rate-limited rows: the client time in whole µs (ARGV[17]), then +1 µs per row; exact
-- integers in a Lua number, written as seconds with six decimals.
local rate_us = tonumber(client_s)
client_s = string.format('%d', math.floor(rate_us / 1000000)) -- RQ's own scores are whole seconds
local queue_prefix = string.sub(job_prefix, 1, #job_prefix - #'job:') .. 'queue:' -- '<prefix>:queue:'

local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if now_ms > deadline then return {'', '', 'LATE', now_ms, ''} end
if fence_key ~= '' and redis.call('GET', fence_key) ~= fence_token then return {'', '', 'FENCED', now_ms, ''} end

if fence_key ~= '' then redis.call('PEXPIRE', fence_key, backstop) end -- lives while its holder pushes

-- A batch is decoded whole: a row whose stored bytes are not MessagePack (a corrupt outbox row) makes
-- the call write nothing and say so; the replayer then pushes that batch a row at a time.
local decoded, rows = pcall(cmsgpack.unpack, ARGV[19])
if not decoded then return {'', '', 'UNDECODABLE', now_ms, ''} end
local codes = {}

local function write(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then error(reply.err, 0) end
  return reply
end

-- RQ defers a job while any parent exists and is not finished (RQ 3, allow_dependency_failures:
-- nor failed); a parent it cannot find counts as done. Not so a parent whose row went to an outbox
-- (outbox_parents) and has not been pushed yet (neither its delivery marker nor the trace of its
-- push exists): the job is deferred and registered as its dependent, as RQ does for an unfinished
-- parent, and RQ enqueues it once that parent, pushed at last, finishes (or fails, for a job that
-- allows failures). A parent pushed, finished and expired since counts as done, as in RQ.
local function pushed(delivery)
  return redis.call('EXISTS', marker_prefix .. delivery, pushed_prefix .. delivery) > 0
end

-- Returns whether to defer, and the outbox parents not pushed yet. Each of those gets a placeholder hash
-- (status 'deferred') until it is pushed: RQ, deciding later whether the job's other parents are done,
-- counts a parent it cannot find as done, and would run the job before it.
local function must_defer(deps, failed_ok, outbox_parents)
  local defer, unpushed = false, {}
  for _, dep in ipairs(deps) do
    local status = redis.call('HGET', job_prefix .. dep, 'status')
    local met = status == 'finished' or (failed_ok and status == 'failed')
    if redis.call('EXISTS', job_prefix .. dep) == 1 then
      if not met then defer = true end
    elseif outbox_parents and type(outbox_parents[dep]) == 'string' and not pushed(outbox_parents[dep]) then
      defer = true
      unpushed[#unpushed + 1] = dep
    end
  end
  return defer, unpushed
end

-- What a push of an outbox row leaves for its dependents (see must_defer), whether it wrote the job,
-- found it written already (its marker) or skipped it (unique): that it was pushed.
local function trace(delivery)
  if trace_ms > 0 and delivery ~= '' then write('SET', pushed_prefix .. delivery, '1', 'PX', trace_ms) end
end

-- RQ 3's ACQUIRE_AND_ENQUEUE_SCRIPT (rq/rate_limit.py): fill the limit's free slots with its
-- waiting jobs, oldest first.
local function acquire(limit, concurrency)
  local allowed, waiting = limit .. ':allowed', limit .. ':rate_limited'
  while redis.call('ZCARD', allowed) < concurrency do
    local popped = redis.call('ZPOPMIN', waiting)
    if #popped == 0 then break end
    local job_id = popped[1]
    local job_key = job_prefix .. job_id
    local found = redis.call('HMGET', job_key, 'origin', 'status', 'enqueue_at_front')
    if found[1] and found[2] == 'rate_limited' then
      write('ZADD', allowed, client_s, job_id)
      write(found[3] == '1' and 'LPUSH' or 'RPUSH', queue_prefix .. found[1], job_id)
      write('HSET', job_key, 'status', 'queued', 'enqueued_at', client_stamp)
    end
  end
end

-- Whether this delivery is in Redis already. Releases before 0.4 key their marker by the job
-- id (value '1'); this release sets that key too, holding the delivery id, for as long as its
-- own marker lives, so that a replayer of such a release running beside it (a deploy) skips
-- the rows this release pushed, and this release skips the rows that one pushed. A row with
-- no delivery id (written by such a release, or into a table without the column) is known by
-- its job id: '0' is this release's push of one. Such a key ('1' or '0') stands for this
-- delivery only if it was set within the last window (the same row pushed by another reader
-- moments ago, or this delivery's spilled row, stored without its id, replayed before this
-- late request): an older one is an earlier enqueue of the same job id, which must not hide
-- this one. Even a direct write looks: its request may reach Redis after its spilled row
-- was replayed (held in the network past the timeout).
local function delivered(job_id, delivery)
  local key = legacy_prefix .. job_id
  local legacy = redis.call('GET', key)
  if delivery == '' then return legacy ~= false end
  if redis.call('EXISTS', marker_prefix .. delivery) == 1 or legacy == delivery then return true end
  if legacy ~= '1' and legacy ~= '0' then return false end
  return tonumber(backstop) - redis.call('PTTL', key) < window
end

local function push_row(job_id, delivery, at_front, scheduled_at, fields, options)
  if delivered(job_id, delivery) then
    trace(delivery)
    return 0
  end
  local opts = (options ~= nil and options ~= '') and cjson.decode(options) or {}
  local job_key = job_prefix .. job_id
  -- A placeholder its dependents left (must_defer): this is the job it stood for; it goes, the
  -- dependents set stays.
  if redis.call('HGET', job_key, 'spillover_placeholder') == '1' then redis.call('DEL', job_key) end
  if opts.unique and redis.call('EXISTS', job_key) == 1 then -- RQ's unique check
    trace(delivery)
    return 4
  end
  local ttl, deps, limit, concurrency = '', {}, nil, nil
  for f = 1, #fields, 2 do
    local name = fields[f]
    if name == 'ttl' then ttl = fields[f + 1]
    elseif name == 'dependency_ids' then deps = cjson.decode(fields[f + 1])
    elseif name == 'rate_limit_key' then limit = fields[f + 1]
    elseif name == 'rate_limit_concurrency' then concurrency = tonumber(fields[f + 1]) end
  end

  local code, unpushed = 1, {}
  if scheduled_at ~= '' then code = 3
  elseif #deps > 0 then
    local defer
    defer, unpushed = must_defer(deps, opts.failed_ok, opts.outbox_parents)
    if defer then code = 2 elseif limit and concurrency then code = 5 end
  elseif limit and concurrency then code = 5 end

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
  -- A dependents set already there while the job is not: children pushed before this job (outbox_parents),
  -- registered as RQ registers the dependents of a job it has. RQ would have added them after the job and
  -- its ttl: they stay without it, as in RQ (looked at only for a job with a ttl).
  local waiting = ttl ~= '' and redis.call('EXISTS', job_key) == 0 and redis.call('EXISTS', job_key .. ':dependents') == 1
  write('HSET', job_key, unpack(fields))
  if code == 2 then write('ZADD', deferred_key, clock[1], job_id) end
  for _, dep in ipairs(unpushed) do
    write('HSET', job_prefix .. dep, 'status', 'deferred', 'spillover_placeholder', '1')
  end
  if code == 2 or opts.register then -- enqueue_many registers every dependent job, met or not
    for _, dep in ipairs(deps) do
      write('SADD', job_prefix .. dep .. ':dependents', job_id)
      write('SADD', job_prefix .. ':' .. job_id .. ':dependencies', dep)
    end
  end
  if ttl ~= '' and tonumber(ttl) > 0 then
    write('EXPIRE', job_key, ttl)
    if not waiting then write('EXPIRE', job_prefix .. job_id .. ':dependents', ttl) end
    write('EXPIRE', job_prefix .. ':' .. job_id .. ':dependencies', ttl)
  end
  -- Everything that may fail goes before the job is made runnable: a row that fails half-way is
  -- written again, and a second push of its id must not happen.
  if opts.group then -- RQ's Group.enqueue_many: the group's set of job ids, and the set of groups
    write('SADD', group_prefix .. opts.group, job_id)
    write('SADD', groups_set, opts.group)
  end
  local config = code == 5 and (rl_prefix .. limit) or nil
  if code == 5 then -- RQ 3's _enqueue_rate_limited_job: register the limit, mark the job, let it wait
    if at_front == '1' then write('HSET', job_key, 'enqueue_at_front', '1') end
    write('SADD', rl_keys, limit)
    write('HSET', config, 'concurrency', concurrency)
    rate_us = rate_us + 1 -- one call's rows keep their order (RQ: whole seconds, ties by job id)
    local score = string.format('%d.%06d', math.floor(rate_us / 1000000), rate_us % 1000000)
    write('ZADD', config .. ':rate_limited', score, job_id)
  end
  if code == 3 then
    write('ZADD', scheduled_key, scheduled_at, job_id)
  elseif code == 1 then
    write(at_front == '1' and 'LPUSH' or 'RPUSH', queue_key, job_id)
  elseif code == 5 then -- fill the free slots, oldest first
    acquire(config, concurrency)
    if redis.call('HGET', job_key, 'status') == 'queued' then code = 1 end -- it had a free slot
  end
  if delivery == '' then -- '0': pushed by this release, which looks at '1' only for older releases' pushes
    write('SET', legacy_prefix .. job_id, '0', 'PX', backstop)
  else
    write('SET', marker_prefix .. delivery, '1', 'PX', backstop)
    write('SET', legacy_prefix .. job_id, delivery, 'PX', backstop)
    -- An outbox row's push outlives its marker (settled one window after the row is gone): a dependent
    -- pushed later, once this job has finished and expired, must still see that it was pushed.
    trace(delivery)
  end
  return code
end

-- How long the batch ran, in Redis's time: the replayer sizes its batches by it (a long script makes
-- Redis answer BUSY to every other client, which producers take for an outage).
local function took_us()
  local now = redis.call('TIME')
  return tostring((tonumber(now[1]) - tonumber(clock[1])) * 1000000 + tonumber(now[2]) - tonumber(clock[2]))
end

-- RQ registers the queue with every enqueue; once per batch is the same set.
local registered, failure = pcall(write, 'SADD', queues_set, queue_key)
if not registered then return {'', tostring(failure), '', now_ms, '1'} end

for n, row in ipairs(rows) do
  local ok, result = pcall(push_row, row[1], row[2], row[3], row[4], row[5], row[6])
  if not ok then return {table.concat(codes), tostring(result), '', now_ms, '', took_us()} end
  codes[n] = result
end
return {table.concat(codes), '', '', now_ms, '', took_us()}
