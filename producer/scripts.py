"""Lua scripts: the steps that must read and write atomically. Each touches one slot only."""
from __future__ import annotations

# KEYS: shard stream, enqueued guard (keys.enqueued).  ARGV: job json, queue limit, guard ttl (s)
# -> {1, entry id} enqueued | {0, entry id} already submitted | {-1, length} queue full
SUBMIT = """
local existing = redis.call('GET', KEYS[2])
if existing then return {0, existing} end
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[2]) then return {-1, tostring(n)} end
local eid = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
redis.call('SET', KEYS[2], eid, 'EX', ARGV[3])
return {1, eid}
"""

# KEYS: replay stream.  ARGV: seq, end, chunk json, maxlen, ttl (s), channel, final (0|1),
#   final marker body (the chunk json without its seq, text and tokens: used when a re-run
#   finishes at a seq clients have already passed)
# Appends the chunk only if no chunk already covers its seq, so a re-run (or a duplicate
# delivery) never shows a client the same token twice; -> 1 appended, 0 skipped
PUBLISH_CHUNK = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local nxt = 0
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'final' then return 0 end
    if f[i] == 'end' then nxt = tonumber(f[i + 1]) end
  end
end
local seq, stop, data = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if seq < nxt then
  if ARGV[7] ~= '1' then return 0 end
  seq, stop = nxt, tostring(nxt)
  data = '{"seq":' .. nxt .. ',"text":"","token_ids":[],' .. ARGV[8]
end
if ARGV[7] == '1' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'seq', seq, 'end', stop, 'data', data, 'final', '1')
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'seq', seq, 'end', stop, 'data', data)
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[6], data)
return 1
"""

# KEYS: the tenant's token bucket (keys.tenant_rate).  ARGV: rate (tokens/s), burst (bucket size)
# Takes one token if there is one. Redis's clock, so every API process refills alike.
# -> {1, 0} allowed | {0, ms until a token is back}
TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local ok, wait = 1, 0
if tokens >= 1 then tokens = tokens - 1 else ok, wait = 0, math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {ok, wait}
"""

# KEYS: the tenant's in-flight set (keys.tenant_inflight).  ARGV: job id, limit, max age (s)
# Admits the job if the tenant holds fewer than ``limit`` queued/running jobs; members older
# than ``max age`` (the idempotency window: finished or lost for sure) are dropped first.
# -> {1, count} admitted | {0, count} already counted | {-1, count} at the limit
RESERVE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {0, redis.call('ZCARD', KEYS[1])} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then return {-1, n} end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, n + 1}
"""
