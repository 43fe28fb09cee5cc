"""The Redis store's Lua scripts: each runs atomically on the server.

Each script's KEYS and ARGV are listed above it; redis.py builds them (key names come from
redis_layout.RedisKeys).
"""

from __future__ import annotations

__all__ = ["SET_CHECKPOINT", "WRITE_EXECUTION", "APPEND_IF_NEW", "CLAIM",
           "EXPIRED_WITH_STATUS"]

# KEYS: 1 latest checkpoint, 2 its seq. ARGV: 1 packed version, 2 its seq.
# The furthest step's checkpoint stays the latest: a version that lands late (re-sent after
# an outage, or from a slow worker after the next step ran elsewhere) cannot go back.
# EVAL, not EVALSHA: it runs inside append's MULTI, where a NOSCRIPT would abort it.
SET_CHECKPOINT = """
local current = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[2]) >= current then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: 1 execution hash, 2 created index, 3 lease index, 4.. one index per status.
# ARGV: 1 mode (create | replace | update), 2 id, 3 created score ('' = keep),
#       4 status slot (1-based into the status keys, 0 = keep), 5 lease score ('-' = clear,
#       '' = keep), 6.. field, value pairs.
# One script so that a record and its index entries never disagree, even for a moment.
_EXECUTION_FN = """
local function write_execution(K, A)
  local exists = redis.call('EXISTS', K[1]) == 1
  local mode, id = A[1], A[2]
  if mode == 'create' and exists then return 0 end
  if mode == 'update' and not exists then return 0 end
  if mode ~= 'update' then redis.call('DEL', K[1]) end
  redis.call('HSET', K[1], unpack(A, 6))
  local created = A[3]
  if created == '' then
    created = redis.call('ZSCORE', K[2], id) or '0'
  else
    redis.call('ZADD', K[2], created, id)
  end
  local slot = tonumber(A[4])
  if slot > 0 then
    for i = 4, #K do
      if i - 3 == slot then redis.call('ZADD', K[i], created, id)
      else redis.call('ZREM', K[i], id) end
    end
  end
  if A[5] == '-' then redis.call('ZREM', K[3], id)
  elseif A[5] ~= '' then redis.call('ZADD', K[3], A[5], id) end
  return 1
end
"""
WRITE_EXECUTION = _EXECUTION_FN + "return write_execution(KEYS, ARGV)\n"

# A step's entry check and its RUNNING record in one round trip. KEYS: 1 the node's versions,
# 2 its execution's node index, 3.. the execution's keys as in WRITE_EXECUTION. ARGV: 1 the
# packed version, 2 its seq, 3 the node id, 4.. WRITE_EXECUTION's arguments. Returns the
# latest version if the node has one (and writes nothing), else false.
APPEND_IF_NEW = _EXECUTION_FN + """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('LINDEX', KEYS[1], -1) end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if #ARGV > 3 then
  write_execution({unpack(KEYS, 3)}, {unpack(ARGV, 4)})
end
return false
"""

# KEYS: 1 execution hash, 2 lease index. ARGV: 1 expected fence, 2 owner (JSON),
# 3 deadline, 4 id. The deadline comes from the client's clock, like every other deadline
# the engine writes and every `lease_expired_before` it asks with.
CLAIM = """
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence or tonumber(fence) ~= tonumber(ARGV[1]) then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
redis.call('HSET', KEYS[1], 'fence', string.format('%d', tonumber(fence) + 1),
           'lease_owner', ARGV[2], 'lease_deadline', ARGV[3],
           'attempts', string.format('%d', attempts + 1))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# KEYS: 1 lease index, 2 status index. ARGV: 1 exclusive max deadline, 2 offset, 3 limit.
# Walks the expired part of the lease index in deadline order, keeping those in the status.
EXPIRED_WITH_STATUS = """
local out, skip, want, start = {}, tonumber(ARGV[2]), tonumber(ARGV[3]), 0
while #out < want do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', start, 500)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #out >= want then break end
    if redis.call('ZSCORE', KEYS[2], id) then
      if skip > 0 then skip = skip - 1 else out[#out + 1] = id end
    end
  end
  start = start + 500
end
return out
"""
