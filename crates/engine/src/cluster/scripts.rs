//! The Lua scripts cluster mode runs in Redis. Each touches only the keys
//! it is given (so each runs on the one Redis Cluster node owning them)
//! except the presence sweep, whose keys all share the `{P}` hash tag.

use redis::Script;

/// GCRA (the generic cell rate algorithm, as go-redis/redis_rate does it)
/// with Redis's clock: `count` events at once, refilled at `count` per
/// `per_ms`: the same budget as the local token bucket.
/// KEYS[1]: the state (the theoretical arrival time, ms).
/// ARGV: count, per_ms. Returns {allowed (0/1), retry_after_ms}.
const GCRA: &str = r"
local count = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = period / count
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat + interval - count * interval
if now < allow_at then
  return {0, math.ceil(allow_at - now)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {1, 0}
";

/// Takes a lease for ARGV[1] (the node) for ARGV[2] ms, or renews it if
/// the node holds it. Returns 1 if the node holds it now.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// The shared cache's read, or the lease to fill it, in one atomic step
/// (no node can take the lease between another's write and this read).
/// KEYS[1]: the value, KEYS[2]: the lease (same hash tag). ARGV: node,
/// lease ms. Returns {1, value, pttl} (a hit), {2, '', 0} (the lease is
/// this node's) or {0, '', 0} (another node is fetching).
const READ_OR_LEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  return {1, v, redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, '', 0}
end
return {0, '', 0}
";

/// Deletes the lease KEYS[1] if ARGV[1] holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Presence: drops expired nodes (their HASH field, ZSET entry and user
/// SET) and sums the live ones.
/// KEYS[1]: nodes HASH (node → "connections users"), KEYS[2]: expiry ZSET.
/// ARGV[1]: the prefix of the per-node user SETs.
/// Returns {nodes, connections, distinct users}.
const SWEEP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, n in ipairs(dead) do
  redis.call('HDEL', KEYS[1], n)
  redis.call('ZREM', KEYS[2], n)
  redis.call('DEL', ARGV[1] .. n)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
local conns = 0
local sets = {}
for _, n in ipairs(live) do
  local v = redis.call('HGET', KEYS[1], n)
  if v then
    conns = conns + (tonumber(string.match(v, '^(%d+)')) or 0)
  end
  table.insert(sets, ARGV[1] .. n)
end
local users = 0
if #sets > 0 then
  users = #redis.call('SUNION', unpack(sets))
end
return {#live, conns, users}
";

/// The scripts, hashed once.
pub(crate) struct Scripts {
    pub(crate) gcra: Script,
    pub(crate) lease: Script,
    pub(crate) release: Script,
    pub(crate) sweep: Script,
    pub(crate) read_or_lease: Script,
    pub(crate) recover: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            gcra: Script::new(GCRA),
            lease: Script::new(LEASE),
            release: Script::new(RELEASE),
            sweep: Script::new(SWEEP),
            read_or_lease: Script::new(READ_OR_LEASE),
            recover: super::history::recover_script(),
        }
    }
}
