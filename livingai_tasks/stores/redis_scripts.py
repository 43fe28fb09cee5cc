"""The Redis store's Lua scripts: each runs atomically on the server.

Each script's KEYS and ARGV are listed above it; redis.py builds them (key names come from
redis_layout.RedisKeys).
"""

from __future__ import annotations

from .redis_layout import SEAL_FIELD, SEALED_FIELDS

__all__ = ["WRITE_BATCH", "WRITE_EXECUTION", "APPEND_IF_NEW", "WRITE_BATCH_THEN_APPEND_IF_NEW",
           "CLAIM", "EXPIRED_WITH_STATUS"]

# KEYS: 1 execution hash, 2 created index, 3 lease index, 4.. one index per status (needed,
# and sent, only by a write that sets a status).
# ARGV: 1 mode (create | replace | update), 2 id, 3 created score ('' = keep),
#       4 status slot (1-based into the status keys, 0 = keep), 5 lease score ('-' = clear,
#       '' = keep), 6 if_fence ('' = none: apply whatever the fence), 7.. field, value pairs.
# Returns 1 if written, 0 if not (create: it exists; update: it is missing), -1 if the
# execution's fence is above if_fence.
# One script so that a record and its index entries never disagree, even for a moment.
# Every script that writes an execution hash seals it last (redis_layout.execution_seal).
_SEAL_FN = """
local SEALED = {__SEALED__}
local function seal(key)
  local values = redis.call('HMGET', key, unpack(SEALED))
  local parts = {}
  for i, name in ipairs(SEALED) do
    if values[i] then parts[#parts + 1] = name .. '=' .. values[i] end
  end
  redis.call('HSET', key, '__SEAL_FIELD__', redis.sha1hex(table.concat(parts, '\\n')))
end
""".replace("__SEALED__", ", ".join(f"'{name}'" for name in SEALED_FIELDS)).replace(
    "__SEAL_FIELD__", SEAL_FIELD)
_EXECUTION_FN = _SEAL_FN + """
local function write_execution(K, A)
  local exists = redis.call('EXISTS', K[1]) == 1
  local mode, id = A[1], A[2]
  if mode == 'create' and exists then return 0 end
  if mode == 'update' and not exists then return 0 end
  if A[6] ~= '' and tonumber(redis.call('HGET', K[1], 'fence') or '0') > tonumber(A[6]) then
    return -1
  end
  if mode ~= 'update' then redis.call('DEL', K[1]) end
  redis.call('HSET', K[1], unpack(A, 7))
  local created, slot = A[3], tonumber(A[4])
  if created ~= '' then redis.call('ZADD', K[2], created, id) end
  if slot > 0 then  -- the status indexes are scored by created (a lease renewal skips this)
    if created == '' then created = redis.call('ZSCORE', K[2], id) or '0' end
    for i = 4, #K do
      if i - 3 == slot then redis.call('ZADD', K[i], created, id)
      else redis.call('ZREM', K[i], id) end
    end
  end
  if A[5] == '-' then redis.call('ZREM', K[3], id)
  elseif A[5] ~= '' then redis.call('ZADD', K[3], A[5], id) end
  seal(K[1])
  return 1
end
"""
WRITE_EXECUTION = _EXECUTION_FN + "return write_execution(KEYS, ARGV)\n"

# How a version reaches its node's list. A value read into a script (an argument, or a
# command's reply) costs the server about 1.4 us per KB, where a plain command that stores it
# costs a fraction of a us (measured on Redis 7.0, loadtest/README.md, "Versions kept out of
# Lua"): a step's 20-40 KB versions made the scripts most of the server's time. So a call
# pushes each version to a staging list of its own in the same MULTI/EXEC as its script
# (redis.py), and the script only moves it: by RENAME onto the node's list when the list is
# new, or when it holds nothing but the version this one replaces; otherwise by LMOVE, which
# reads it (an append to a longer list: a tool's outcome, a crash mark). KEYS of place():
# the node's versions, the staged version, the execution's heads (node id -> the header of
# the node's latest version: what "still the latest" is checked against without reading the
# version). A version replaces the list's latest only if the heads say it is still the one
# given (`replaces`, '' = none): the RUNNING version its writer stored, with nothing
# appended since (_common.SupersedableVersions).
_PLACE_FN = """
local function place(versions, stage, heads, id, replaces, header)
  local n = redis.call('LLEN', versions)
  local replacing = replaces ~= '' and n > 0 and redis.call('HGET', heads, id) == replaces
  if n == 0 or (replacing and n == 1) then
    redis.call('RENAME', stage, versions)
  else
    redis.call('LMOVE', stage, versions, 'LEFT', 'RIGHT')
    if replacing then  -- the replaced version is now second to last: mark it, then drop it
      redis.call('LSET', versions, -2, '-')
      redis.call('LREM', versions, -1, '-')
    end
  end
  redis.call('HSET', heads, id, header)
end
"""

# A batch of node versions and execution updates in one script (one for the whole batch,
# in the call's MULTI/EXEC: one script per part cost the client more packing and the server
# more commands). KEYS: seven per node in batch order (its versions, its execution's node index,
# the execution hash, the latest checkpoint, its seq, the staged version, the execution's
# heads), then each update's keys as in WRITE_EXECUTION (the status indexes only when it sets
# a status). ARGV: 1 the number of nodes, then six per node (its seq, the node id, the fence
# it was made under, 1 if it carries a checkpoint else 0, the header of the version it may
# replace ('' = none), its own header), then per update the number of its keys, the number
# of its arguments and WRITE_EXECUTION's arguments.
# A version whose fence is below its execution's is refused (its staged copy dropped; the
# rest are written); the fence is read in the same script, so no claim can come between the
# check and the write. The furthest step's checkpoint stays the latest: a version that lands
# late (re-sent after an outage, or from a slow worker after the next step ran elsewhere)
# cannot go back. Returns {the refused node ids, each update's result}.
_WRITE_BATCH_FN = _PLACE_FN + """
local function write_batch(KEYS, ARGV)
local n = tonumber(ARGV[1])
local refused = {}
for i = 0, n - 1 do
  local k, j = i * 7, 1 + i * 6
  local current = tonumber(redis.call('HGET', KEYS[k + 3], 'fence') or '-1')
  if tonumber(ARGV[j + 3]) < current then
    refused[#refused + 1] = ARGV[j + 2]
    redis.call('DEL', KEYS[k + 6])
  else
    place(KEYS[k + 1], KEYS[k + 6], KEYS[k + 7], ARGV[j + 2], ARGV[j + 5], ARGV[j + 6])
    redis.call('ZADD', KEYS[k + 2], ARGV[j + 1], ARGV[j + 2])
    if ARGV[j + 4] == '1' and
        tonumber(ARGV[j + 1]) >= tonumber(redis.call('GET', KEYS[k + 5]) or '-1') then
      redis.call('SET', KEYS[k + 4], redis.call('LINDEX', KEYS[k + 1], -1))
      redis.call('SET', KEYS[k + 5], ARGV[j + 1])
    end
  end
end
local done, kp, ap = {}, n * 7, 1 + n * 6
while ap < #ARGV do
  local nk, m = tonumber(ARGV[ap + 1]), tonumber(ARGV[ap + 2])
  done[#done + 1] = write_execution({unpack(KEYS, kp + 1, kp + nk)},
                                    {unpack(ARGV, ap + 3, ap + 2 + m)})
  kp, ap = kp + nk, ap + 2 + m
end
return {refused, done}
end
"""
WRITE_BATCH = _EXECUTION_FN + _WRITE_BATCH_FN + "return write_batch(KEYS, ARGV)\n"

# A step's entry check and its RUNNING record in one round trip. KEYS: 1 the node's versions,
# 2 its execution's node index, 3 the execution hash, 4 the staged version, 5 the
# execution's heads, 6.. the execution's keys as in WRITE_EXECUTION (when there are changes).
# ARGV: 1 the version's header, 2 its seq, 3 the node id, 4 the node's fence, 5..
# WRITE_EXECUTION's arguments. Fenced first: returns {'fenced', record fence, execution
# fence} if the node's fence (or the changes' if_fence) is below the execution's; then the
# latest version if the node has one (nothing written either way: the staged copy is
# dropped), else writes and returns false.
_APPEND_IF_NEW_FN = """
local function append_if_new(KEYS, ARGV)
local current = tonumber(redis.call('HGET', KEYS[3], 'fence') or '-1')
local record = tonumber(ARGV[4])
if #ARGV > 4 and ARGV[10] ~= '' then record = math.min(record, tonumber(ARGV[10])) end
if record < current then
  redis.call('DEL', KEYS[4])
  return {'fenced', record, current}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[4])
  return redis.call('LINDEX', KEYS[1], -1)
end
redis.call('RENAME', KEYS[4], KEYS[1])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if #ARGV > 4 then
  write_execution({unpack(KEYS, 6)}, {unpack(ARGV, 5)})
end
return false
end
"""
APPEND_IF_NEW = _EXECUTION_FN + _APPEND_IF_NEW_FN + "return append_if_new(KEYS, ARGV)\n"

# A write batch queued behind the previous step of this process, then the next step's entry
# (APPEND_IF_NEW), in one script: one round trip a step where there were two, and the entry
# never lands before the writes queued ahead of it (a failing batch stops the script before
# the entry runs). KEYS: the batch's keys, then the entry's. ARGV: 1 the number of the
# batch's keys, 2 the number of its arguments, then the batch's arguments (as WRITE_BATCH),
# then the entry's (as APPEND_IF_NEW). Returns {WRITE_BATCH's reply, APPEND_IF_NEW's}.
WRITE_BATCH_THEN_APPEND_IF_NEW = _EXECUTION_FN + _WRITE_BATCH_FN + _APPEND_IF_NEW_FN + """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local written = write_batch({unpack(KEYS, 1, nk)}, {unpack(ARGV, 3, 2 + na)})
return {written, append_if_new({unpack(KEYS, nk + 1)}, {unpack(ARGV, 3 + na)})}
"""

# KEYS: 1 execution hash, 2 lease index. ARGV: 1 expected fence, 2 owner (JSON),
# 3 deadline, 4 id, 5 now. The deadline and now come from the client's clock, like every
# other deadline the engine writes and every `lease_expired_before` it asks with. A lease
# still live at `now` (renewed since the claimer listed it) makes the claim fail.
CLAIM = _SEAL_FN + """
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence or tonumber(fence) ~= tonumber(ARGV[1]) then return 0 end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_deadline') or 'null')
if lease and lease >= tonumber(ARGV[5]) then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
redis.call('HSET', KEYS[1], 'fence', string.format('%d', tonumber(fence) + 1),
           'lease_owner', ARGV[2], 'lease_deadline', ARGV[3],
           'attempts', string.format('%d', attempts + 1))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
seal(KEYS[1])
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
