"""The Lua scripts that make each Redis store operation atomic (one script = one step of the contract).

Keys (prefix `edgechat:`): `session:<id>` a hash per session; `lease:<id>` the turn lock (SET NX PX,
expires by itself); `sessions` a sorted set id -> last_active (TTL order and LRU order);
`sessions:messages` / `sessions:tokens` sorted sets id -> size (the maxima in O(log n));
`sessions:messages_total` a counter; `sessions:owner` a hash id -> owner (it outlives a hash Redis
expired, so the owner's index can still be cleaned); `owner:<owner>` a sorted set per owner
id -> last_active (its LRU order); `owners` a sorted set owner -> sessions held. Every script keeps these in step. Key names are built inside the
scripts, so a Redis Cluster is not supported (one primary, any database number).

Floats arrive as Python repr strings and are compared in Lua doubles, exactly as Python compares
them (`now - last_active >= ttl`), so every backend expires the same sessions at the same instant.
"""

PRELUDE = """
local P = ARGV[1]
local INDEX, BY_MESSAGES, BY_TOKENS = P .. 'sessions', P .. 'sessions:messages', P .. 'sessions:tokens'
local TOTAL = P .. 'sessions:messages_total'
local OWNER_OF, OWNERS = P .. 'sessions:owner', P .. 'owners'
local function okey(owner) return P .. 'owner:' .. owner end
local function skey(id) return P .. 'session:' .. id end
local function lkey(id) return P .. 'lease:' .. id end
local function leased(id) return redis.call('EXISTS', lkey(id)) == 1 end
local function remove(id)
  local n = redis.call('ZSCORE', BY_MESSAGES, id)
  if n then redis.call('DECRBY', TOTAL, tonumber(n)) end
  local owner = redis.call('HGET', OWNER_OF, id)
  if owner then
    redis.call('HDEL', OWNER_OF, id)
    redis.call('ZREM', okey(owner), id)
    if redis.call('ZINCRBY', OWNERS, -1, owner) + 0 <= 0 then redis.call('ZREM', OWNERS, owner) end
  end
  redis.call('DEL', skey(id), lkey(id))
  redis.call('ZREM', INDEX, id)
  redis.call('ZREM', BY_MESSAGES, id)
  redis.call('ZREM', BY_TOKENS, id)
end
-- evict up to n of an owner's least recently active sessions, never `keep` or one in a turn
local function evict_owned(owner, keep, n)
  local evicted, start = 0, 0
  while evicted < n do
    local batch = redis.call('ZRANGE', okey(owner), start, start + 63)
    if #batch == 0 then break end
    local kept = 0
    for _, other in ipairs(batch) do
      if evicted < n and other ~= keep and not leased(other) then
        remove(other); evicted = evicted + 1
      else
        kept = kept + 1
      end
    end
    start = start + kept
  end
  return evicted
end
local function idle(last_active, now, ttl) return ttl > 0 and now - last_active >= ttl end
local function expire_all(now, ttl)
  if ttl <= 0 then return 0 end
  local found, n = redis.call('ZRANGEBYSCORE', INDEX, '-inf', now - ttl + 1, 'WITHSCORES'), 0
  for i = 1, #found, 2 do
    if idle(tonumber(found[i + 1]), now, ttl) and not leased(found[i]) then
      remove(found[i]); n = n + 1
    end
  end
  return n
end
-- one session as a read sees it: 'missing', 'ttl' (expired now, removed) or 'live'
local function lookup(id, now, ttl)
  if redis.call('EXISTS', skey(id)) == 0 then
    if redis.call('ZSCORE', INDEX, id) then remove(id); return 'ttl' end  -- Redis expired the hash
    return 'missing'
  end
  if not leased(id) and idle(tonumber(redis.call('HGET', skey(id), 'last_active')), now, ttl) then
    remove(id); return 'ttl'
  end
  return 'live'
end
"""

# ARGV: prefix, now, ttl, max_sessions, expire_ms, id, tokens, last_active, per_key, owner,
#       field, value, ... -> {expired, evicted for the owner's quota, evicted beyond max_sessions}
CREATE = PRELUDE + """
local now, ttl, limit, expire_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local id, per_key, owner = ARGV[6], tonumber(ARGV[9]), ARGV[10]
local expired = expire_all(now, ttl)
redis.call('HSET', skey(id), unpack(ARGV, 11))
if expire_ms > 0 then redis.call('PEXPIRE', skey(id), expire_ms) end
redis.call('ZADD', INDEX, ARGV[8], id)
redis.call('ZADD', BY_MESSAGES, 0, id)
redis.call('ZADD', BY_TOKENS, ARGV[7], id)
redis.call('HSET', OWNER_OF, id, owner)
redis.call('ZADD', okey(owner), ARGV[8], id)
redis.call('ZINCRBY', OWNERS, 1, owner)
local quota = 0
if per_key > 0 then quota = evict_owned(owner, id, redis.call('ZCARD', okey(owner)) - per_key) end
local evicted, excess = 0, 0
if limit > 0 then excess = redis.call('ZCARD', INDEX) - limit end
while excess > 0 do
  local largest = redis.call('ZREVRANGE', OWNERS, 0, 0)[1]
  if not largest or evict_owned(largest, id, 1) == 0 then break end
  evicted = evicted + 1; excess = excess - 1
end
return {expired, quota, evicted}
"""

# ARGV: prefix, id, now, ttl -> {state, field, value, ...}
GET = PRELUDE + """
local state = lookup(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if state ~= 'live' then return {state} end
local out = redis.call('HGETALL', skey(ARGV[2]))
table.insert(out, 1, 'live')
return out
"""

# ARGV: prefix, id, now, ttl, owner, lease value, lease_ms, expire_ms -> {state, field, value, ...}
# ('busy', holder's lease value) when another turn holds the session
ACQUIRE = PRELUDE + """
local id = ARGV[2]
local state = lookup(id, tonumber(ARGV[3]), tonumber(ARGV[4]))
if state ~= 'live' then return {state} end
if redis.call('HGET', skey(id), 'owner') ~= ARGV[5] then return {'missing'} end
if not redis.call('SET', lkey(id), ARGV[6], 'NX', 'PX', ARGV[7]) then
  return {'busy', redis.call('GET', lkey(id)) or ''}
end
if tonumber(ARGV[8]) > 0 then redis.call('PEXPIRE', skey(id), ARGV[8]) end
local out = redis.call('HGETALL', skey(id))
table.insert(out, 1, 'ok')
return out
"""

# ARGV: prefix, id, lease value: deletes the lease only if it is still that one (ours, or a dead holder's)
RELEASE = PRELUDE + """
if redis.call('GET', lkey(ARGV[2])) == ARGV[3] then redis.call('DEL', lkey(ARGV[2])) end
return 0
"""

# ARGV: prefix, id, version before, expire_ms, n_messages, tokens, last_active, field, value, ...
COMMIT = PRELUDE + """
local id = ARGV[2]
if redis.call('HGET', skey(id), 'version') ~= ARGV[3] then return 0 end
local old = tonumber(redis.call('ZSCORE', BY_MESSAGES, id) or '0')
redis.call('HSET', skey(id), unpack(ARGV, 8))
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', skey(id), ARGV[4]) end
redis.call('ZADD', INDEX, ARGV[7], id)
local owner = redis.call('HGET', OWNER_OF, id)
if owner then redis.call('ZADD', okey(owner), ARGV[7], id) end
redis.call('ZADD', BY_MESSAGES, ARGV[5], id)
redis.call('ZADD', BY_TOKENS, ARGV[6], id)
redis.call('INCRBY', TOTAL, tonumber(ARGV[5]) - old)
return 1
"""

# ARGV: prefix, id, now, ttl, owner -> 'missing' | 'ttl' | 'deleted'
DELETE = PRELUDE + """
local id = ARGV[2]
local state = lookup(id, tonumber(ARGV[3]), tonumber(ARGV[4]))
if state ~= 'live' then return state end
if redis.call('HGET', skey(id), 'owner') ~= ARGV[5] then return 'missing' end
remove(id)
return 'deleted'
"""

# ARGV: prefix, now, ttl -> {expired, sessions, messages total, longest (messages), most tokens}
STATS = PRELUDE + """
local expired = expire_all(tonumber(ARGV[2]), tonumber(ARGV[3]))
local longest = redis.call('ZREVRANGE', BY_MESSAGES, 0, 0, 'WITHSCORES')[2] or '0'
local tokens = redis.call('ZREVRANGE', BY_TOKENS, 0, 0, 'WITHSCORES')[2] or '0'
return {expired, redis.call('ZCARD', INDEX), redis.call('GET', TOTAL) or '0', longest, tokens}
"""

# ARGV: prefix, now, ttl, owner -> {expired, sessions, messages total, longest, most tokens}: one owner's
OWNER_STATS = PRELUDE + """
local expired = expire_all(tonumber(ARGV[2]), tonumber(ARGV[3]))
local ids = redis.call('ZRANGE', okey(ARGV[4]), 0, -1)
local total, longest, tokens = 0, 0, 0
for _, id in ipairs(ids) do
  local n = tonumber(redis.call('ZSCORE', BY_MESSAGES, id) or '0')
  local t = tonumber(redis.call('ZSCORE', BY_TOKENS, id) or '0')
  total = total + n
  if n > longest then longest = n end
  if t > tokens then tokens = t end
end
return {expired, #ids, total, longest, tokens}
"""

# ARGV: prefix: schema 1 -> 2, index every session by owner (sessions without a hash are dropped)
MIGRATE_OWNERS = PRELUDE + """
local all = redis.call('ZRANGE', INDEX, 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local id, last_active = all[i], all[i + 1]
  local owner = redis.call('HGET', skey(id), 'owner')
  if not owner then
    remove(id)
  elseif not redis.call('HGET', OWNER_OF, id) then
    redis.call('HSET', OWNER_OF, id, owner)
    redis.call('ZADD', okey(owner), last_active, id)
    redis.call('ZINCRBY', OWNERS, 1, owner)
  end
end
redis.call('SET', P .. 'schema_version', 2)
return #all / 2
"""
