"""What the shared queue keeps in Redis, and the Lua scripts that change it atomically.

Keys (one Redis or Valkey database per deployment; scripts touch keys of one job at a time plus
the shared ones, so a single instance, not Cluster)::

    bd:queue            stream, consumer group "replicas": one entry {id} per accepted job, acknowledged
                        and deleted when the job ends; its pending list holds the running jobs and
                        their leases (idle time = time since the owner last renewed); jobs waiting =
                        its length minus its pending entries
    bd:job:{id}         hash: request (JSON), kind, status (queued|running|succeeded|failed|cancelled),
                        created_at, finished_at, attempt, owner (replica), qid (queue entry), preview_id
    bd:ev:{id}          stream of the worker events of the job ({k: kind, d: JSON}), replayed then followed;
                        previews are state: a new one deletes the previous one, so it holds at most one
    bd:gone:{id}        why an id is gone (deleted | evicted | expired): 410 instead of 404
    bd:idem:{sha256}    Idempotency-Key -> job id, for job_ttl_s
    bd:finished         zset id -> finish time (ms): the count / byte bounds, oldest out first
    bd:sizes            hash id -> bytes of a finished job;  bd:finished_bytes: their sum
    bd:done             zset id -> finish time (ms) of the last 512 completions: the measured drain rate
    bd:cancel           pub/sub channel: "{id}" -> the replica running it cancels it at once

Every write of a job's events is *fenced*: it names the owner and attempt that wrote it, and is
dropped when the job was reclaimed by another replica (or cancelled, deleted, finished) since,
so a replica that was only partitioned never writes over the re-run, and a job completes once.
Bytes in events are base64 in JSON (``{"$b": ...}``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

PREFIX = "bd:"
QUEUE = PREFIX + "queue"
GROUP = "replicas"
FINISHED = PREFIX + "finished"
SIZES = PREFIX + "sizes"
FINISHED_BYTES = PREFIX + "finished_bytes"
DONE = PREFIX + "done"
CANCEL_CHANNEL = PREFIX + "cancel"
TOMBSTONE_TTL_S = 86_400  # how long a gone id answers 410
TERMINAL_STATUS = ("succeeded", "failed", "cancelled")


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}ev:{job_id}"


def gone_key(job_id: str) -> str:
    return f"{PREFIX}gone:{job_id}"


def idem_key(key: str) -> str:
    return PREFIX + "idem:" + hashlib.sha256(key.encode()).hexdigest()


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$b" in obj:
        return base64.b64decode(obj["$b"])
    return obj


def encode(data: Any) -> str:
    return json.dumps(data, default=_default, separators=(",", ":"))


def decode(text: str) -> Any:
    return json.loads(text, object_hook=_hook)


# Jobs waiting = entries in the queue stream (deleted when a job ends or is cancelled) minus those
# delivered to a replica (the group's pending list): exact, with no counter to drift.
# KEYS: queue   ARGV: group  ->  waiting
WAITING_LUA = """
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
local delivered = ok and tonumber(pending[1]) or 0
return math.max(0, redis.call('XLEN', KEYS[1]) - delivered)
"""
_WAITING_FN = "local function count_waiting(q, group)" + WAITING_LUA.replace("KEYS[1]", "q").replace("ARGV[1]", "group")
_WAITING_FN += "end\n"

# KEYS: queue, (unused), job, events, idem   ARGV: id, request, kind, created_at, max_queue, idem_ttl_s,
# active_ttl_s, use_idem (0|1), group  ->  {"ok", qid} | {"dup", id} | {"full", waiting}
ENQUEUE = _WAITING_FN + """
if ARGV[8] == '1' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return {'dup', prior} end
end
local waiting = count_waiting(KEYS[1], ARGV[9])
if waiting >= tonumber(ARGV[5]) then return {'full', tostring(waiting)} end
local qid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[3], 'request', ARGV[2], 'kind', ARGV[3], 'status', 'queued', 'created_at', ARGV[4],
           'attempt', '0', 'qid', qid)
redis.call('XADD', KEYS[4], '*', 'k', 'queued', 'd', '{"position":' .. waiting .. '}')
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[7])
if ARGV[8] == '1' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[6]) end
return {'ok', qid}
"""

# A replica takes a job it read from the group (fresh) or claimed after an expired lease.
# KEYS: job, events   ARGV: owner, max_attempts, reason
# -> {attempt, request} to run it | {-1, attempt, request}: attempts used up (the caller fails it) | {0}: skip
TAKE = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return {0} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local pid = redis.call('HGET', KEYS[1], 'preview_id')
if pid then
  redis.call('XDEL', KEYS[2], pid)
  redis.call('HDEL', KEYS[1], 'preview_id')
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1])
if st == 'running' then
  if attempt >= tonumber(ARGV[2]) then
    return {-1, attempt, redis.call('HGET', KEYS[1], 'request')}
  end
  local why = redis.call('HGET', KEYS[1], 'release') or ARGV[3]
  redis.call('XADD', KEYS[2], '*', 'k', 'requeued', 'd', cjson.encode({reason = why, attempt = attempt + 1}))
end
redis.call('HDEL', KEYS[1], 'release')
redis.call('HSET', KEYS[1], 'attempt', attempt + 1)
return {attempt + 1, redis.call('HGET', KEYS[1], 'request')}
"""

# KEYS: job, queue   ARGV: owner, attempt, group  ->  1 renewed | 0 not ours any more
RENEW = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'attempt', 'status', 'qid')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= 'running' then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[1], 0, h[4], 'JUSTID')
return 1
"""

# The owner gives a running job back (its worker died, the replica drains): any replica may take it now.
# KEYS: job, queue   ARGV: owner, attempt, group, reason, idle_ms  ->  1 | 0 not ours
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'attempt', 'status', 'qid')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'release', ARGV[4])
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[1], 0, h[4], 'IDLE', ARGV[5], 'JUSTID')
return 1
"""

# Fenced event write. KEYS: job, events, queue, gone, finished, sizes, finished_bytes, done
# ARGV: owner, attempt, kind, data, status ('' = not terminal), nbytes, ttl_s, max_results, max_bytes, now_ms,
#       group, tombstone_ttl_s  ->  1 written | 0 dropped
APPEND = """
if redis.call('GET', KEYS[4]) == 'deleted' then return 0 end
local h = redis.call('HMGET', KEYS[1], 'owner', 'attempt', 'status', 'qid', 'preview_id')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or h[3] ~= 'running' then return 0 end
if ARGV[3] == 'preview' then
  if h[5] then redis.call('XDEL', KEYS[2], h[5]) end
  redis.call('HSET', KEYS[1], 'preview_id', redis.call('XADD', KEYS[2], '*', 'k', 'preview', 'd', ARGV[4]))
  return 1
end
redis.call('XADD', KEYS[2], '*', 'k', ARGV[3], 'd', ARGV[4])
if ARGV[5] == '' then return 1 end
local now, ttl = tonumber(ARGV[10]), tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'finished_at', now / 1000)
redis.call('XACK', KEYS[3], ARGV[11], h[4])
redis.call('XDEL', KEYS[3], h[4])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local id = string.sub(KEYS[1], string.len('bd:job:') + 1)
if ARGV[3] == 'completed' then
  redis.call('ZADD', KEYS[8], now, id)
  redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -513)
end
redis.call('ZADD', KEYS[5], now, id)
redis.call('HSET', KEYS[6], id, ARGV[6])
redis.call('INCRBY', KEYS[7], ARGV[6])
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - ttl * 1000)) do
  redis.call('ZREM', KEYS[5], old)
  redis.call('DECRBY', KEYS[7], redis.call('HGET', KEYS[6], old) or 0)
  redis.call('HDEL', KEYS[6], old)
  redis.call('SET', 'bd:gone:' .. old, 'expired', 'EX', ARGV[12])
end
while redis.call('ZCARD', KEYS[5]) > tonumber(ARGV[8])
      or tonumber(redis.call('GET', KEYS[7]) or '0') > tonumber(ARGV[9]) do
  local old = redis.call('ZPOPMIN', KEYS[5])[1]
  if not old then break end
  redis.call('DECRBY', KEYS[7], redis.call('HGET', KEYS[6], old) or 0)
  redis.call('HDEL', KEYS[6], old)
  redis.call('DEL', 'bd:job:' .. old, 'bd:ev:' .. old)
  redis.call('SET', 'bd:gone:' .. old, 'evicted', 'EX', ARGV[12])
end
return 1
"""

# Cancel (and with ARGV[4] = '1' delete) from any replica: the terminal event is written here at once;
# the owner, told over pub/sub (or by its next renewal), frees the rows.
# KEYS: job, events, queue, (unused), gone, finished, sizes, finished_bytes
# ARGV: code, message, group, delete, ttl_s, now_ms, tombstone_ttl_s, id  ->  status before | '' unknown
CANCEL = """
local h = redis.call('HMGET', KEYS[1], 'status', 'qid')
local st = h[1]
if not st then return '' end
if st == 'queued' or st == 'running' then
  redis.call('XADD', KEYS[2], '*', 'k', 'failed', 'd', cjson.encode({code = ARGV[1], message = ARGV[2]}))
  redis.call('HSET', KEYS[1], 'status', ARGV[1] == 'cancelled' and 'cancelled' or 'failed',
             'finished_at', tonumber(ARGV[6]) / 1000)
  redis.call('XACK', KEYS[3], ARGV[3], h[2])
  redis.call('XDEL', KEYS[3], h[2])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('EXPIRE', KEYS[2], 10)
  redis.call('SET', KEYS[5], 'deleted', 'EX', ARGV[7])
  if redis.call('ZREM', KEYS[6], ARGV[8]) == 1 then
    redis.call('DECRBY', KEYS[8], redis.call('HGET', KEYS[7], ARGV[8]) or 0)
    redis.call('HDEL', KEYS[7], ARGV[8])
  end
end
return st
"""
