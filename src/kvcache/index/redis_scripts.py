"""The Lua scripts of the Redis/Valkey backend (see docs/redis.md for the key layout).

A block's value is its entry set as ``","`` followed by ``"<entry id>,"`` per entry, so
membership, append and removal are plain ``string.find``/``sub`` calls in C. Every script
touches the keys of one bucket (one hash tag, one cluster slot) only, so it runs atomically on
one node. Lua 5.1 (Redis 6.2) compatible.
"""

from __future__ import annotations

import hashlib

# KEYS: reverse sets of the m entries, then the block keys. ARGV: ttl ms (0: none), m, ids.
# Returns the 1-based positions of block keys that already held every entry.
ADD = b"""
local ttl = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local pats = {}
for j = 1, m do pats[j] = ',' .. ARGV[2 + j] .. ',' end
local again = {}
local added = {}
for j = 1, m do added[j] = {} end
-- a redis.call costs more than the Lua around it: read the values with MGET and write the
-- changed ones with MSET (no TTL) in chunks of 1000 keys (Lua's unpack has a stack limit)
local writes = {}
for c = m + 1, #KEYS, 1000 do
  local last = math.min(c + 999, #KEYS)
  local values = redis.call('MGET', unpack(KEYS, c, last))
  for i = c, last do
    local k = KEYS[i]
    local v = values[i - c + 1] or ','
    local n = #v
    for j = 1, m do
      if not string.find(v, pats[j], 1, true) then
        v = v .. ARGV[2 + j] .. ','
        local a = added[j]
        a[#a + 1] = string.sub(k, -8)
      end
    end
    if #v ~= n then
      if ttl > 0 then
        redis.call('SET', k, v, 'PX', ttl)
      else
        writes[#writes + 1] = k
        writes[#writes + 1] = v
      end
    else
      again[#again + 1] = i - m
      if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
    end
  end
end
for s = 1, #writes, 2000 do
  redis.call('MSET', unpack(writes, s, math.min(s + 1999, #writes)))
end
for j = 1, m do
  local a = added[j]
  for s = 1, #a, 1000 do
    redis.call('SADD', KEYS[j], unpack(a, s, math.min(s + 999, #a)))
  end
  if ttl > 0 then redis.call('PEXPIRE', KEYS[j], ttl) end
end
return again
"""

# KEYS: reverse sets of the m entries, then the block keys. ARGV: m, ids.
# Returns {pairs removed, "0"/"1" per block key: "1" when it holds no entry afterwards}.
REMOVE = b"""
local m = tonumber(ARGV[1])
local pats = {}
for j = 1, m do pats[j] = ',' .. ARGV[1 + j] .. ',' end
local removed = 0
local flags = {}
local gone = {}
local dels = {}
for j = 1, m do gone[j] = {} end
-- reads by MGET, deletes and reverse-set removals batched; a changed value keeps its TTL
for c = m + 1, #KEYS, 1000 do
  local last = math.min(c + 999, #KEYS)
  local values = redis.call('MGET', unpack(KEYS, c, last))
  for i = c, last do
    local k = KEYS[i]
    local v = values[i - c + 1]
    if v then
      local changed = false
      for j = 1, m do
        local p = string.find(v, pats[j], 1, true)
        if p then
          v = string.sub(v, 1, p) .. string.sub(v, p + #pats[j])
          changed = true
          removed = removed + 1
          local g = gone[j]
          g[#g + 1] = string.sub(k, -8)
        end
      end
      if changed then
        if v == ',' then
          dels[#dels + 1] = k
          v = nil
        else
          redis.call('SET', k, v, 'KEEPTTL')
        end
      end
    end
    flags[#flags + 1] = v and '0' or '1'
  end
end
for s = 1, #dels, 1000 do
  redis.call('DEL', unpack(dels, s, math.min(s + 999, #dels)))
end
for j = 1, m do
  local g = gone[j]
  for s = 1, #g, 1000 do
    redis.call('SREM', KEYS[j], unpack(g, s, math.min(s + 999, #g)))
  end
end
return {removed, table.concat(flags)}
"""

# KEYS: reverse sets of a pod's entries in one bucket. ARGV: chunk, block-key base, ids.
# Pops up to `chunk` keys per set and strips the entry from them (block keys are named from the
# set members: same hash tag, same slot). Returns {pairs removed, 1 if any set still has keys}.
CLEAR = b"""
local chunk = tonumber(ARGV[1])
local base = ARGV[2]
local removed = 0
local more = 0
for j = 1, #KEYS do
  local pat = ',' .. ARGV[2 + j] .. ','
  local members = redis.call('SPOP', KEYS[j], chunk)
  for _, mem in ipairs(members) do
    local k = base .. mem
    local v = redis.call('GET', k)
    if v then
      local p = string.find(v, pat, 1, true)
      if p then
        v = string.sub(v, 1, p) .. string.sub(v, p + #pat)
        removed = removed + 1
        if v == ',' then redis.call('DEL', k) else redis.call('SET', k, v, 'KEEPTTL') end
      end
    end
  end
  if redis.call('SCARD', KEYS[j]) > 0 then more = 1 end
end
return {removed, more}
"""

# KEYS: a mapping key. ARGV: the value read earlier. Deletes it only if it is unchanged (a
# concurrent add re-wrote it with a new nonce: the mapping is live again).
DELETE_IF = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the dictionary hash. ARGV: encoded entry, pod. Returns the entry's id, allocating one
# (ids are never reused) and recording it under the pod for clear().
ENTRY_ID = b"""
local id = redis.call('HGET', KEYS[1], 'e:' .. ARGV[1])
if id then return id end
id = tostring(redis.call('HINCRBY', KEYS[1], 'n', 1))
local pod = 'p:' .. ARGV[2]
local ids = redis.call('HGET', KEYS[1], pod) or ','
redis.call('HSET', KEYS[1], 'e:' .. ARGV[1], id, 'i:' .. id, ARGV[1], pod, ids .. id .. ',')
return id
"""

ALL: dict[str, bytes] = {
    "ADD": ADD,
    "REMOVE": REMOVE,
    "CLEAR": CLEAR,
    "DELETE_IF": DELETE_IF,
    "ENTRY_ID": ENTRY_ID,
}
SHA: dict[str, bytes] = {
    name: hashlib.sha1(body, usedforsecurity=False).hexdigest().encode()
    for name, body in ALL.items()
}
