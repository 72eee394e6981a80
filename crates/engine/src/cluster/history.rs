//! Topic history in Redis, shared by every node (see `crate::history` for
//! the model). A topic with history has two keys with the same hash tag,
//! so each script runs on the one Redis (Cluster) node owning them (`}`
//! and `%` in a topic are percent-encoded in the tag, `Cluster::tag`):
//!
//! - `P:hm:{TOPIC}`, a HASH: `e` the epoch, `o` the last offset. It is
//!   created by the first publication (never by a read) and expires
//!   `history.meta_ttl_s` after the last; a new one gets a new epoch
//!   (`EPOCH`).
//! - `P:h:{TOPIC}`, a LIST of the last `history_size` publications, each
//!   `OFFSET:UNIX_SECONDS:TEXT`, expiring `history_ttl_s` after the last.
//!
//! A publication is appended and published in one script (`APPEND`):
//! the offset is taken, the positioned text built, stored and sent to the
//! topic's channel with an empty origin, so every node delivers it, this
//! one included, in the order Redis gave. Appends travel in the
//! backplane's pipelines, as `EVAL` (no script cache to keep in step on
//! every Redis node). A recovery (`RECOVER`) reads the position and the
//! publications after the client's in one step.

use std::sync::Arc;

use redis::{FromRedisValue, Value};

use super::{Cluster, ClusterError};
use crate::history::{Position, Recovery, Since};
use crate::websocket::Prepared;

/// A topic's epoch before its first publication, and its stream's when
/// that publication makes it: a digest of this Redis's `run_id`, the
/// meta TTL window the time falls in, and the position's key (the
/// topic). A reader of a topic without publications is given it, so it
/// recovers the first publications like any others; a stream made after
/// a restart or after the last one expired (which takes a whole meta TTL
/// without publications) gets another. Expects `t` (TIME) and `mttl`.
const EPOCH: &str = r#"local function epoch_of(key)
local run=string.match(redis.call('INFO','server'),'run_id:(%x+)')
return string.sub(redis.sha1hex(run..':'..math.floor(tonumber(t[1])/mttl)..':'..key),1,8)
end
"#;

/// KEYS[1]: the list, KEYS[2]: the position. ARGV: the channel, the push
/// with its topic, without its closing brace ([`crate::history::head`]),
/// size, ttl_s, meta_ttl_s. Returns the offset.
const APPEND_BODY: &str = r#"local e=redis.call('HGET',KEYS[2],'e')
if not e then
e=epoch_of(KEYS[2])
redis.call('HSET',KEYS[2],'e',e,'o',0)
redis.call('DEL',KEYS[1])
end
local o=redis.call('HINCRBY',KEYS[2],'o',1)
local text=ARGV[2]..',"offset":'..o..',"epoch":"'..e..'"}'
redis.call('RPUSH',KEYS[1],o..':'..t[1]..':'..text)
redis.call('LTRIM',KEYS[1],-tonumber(ARGV[3]),-1)
redis.call('EXPIRE',KEYS[1],ARGV[4])
redis.call('EXPIRE',KEYS[2],ARGV[5])
redis.call('PUBLISH',ARGV[1],'\n'..text)
return o"#;

/// KEYS as [`APPEND`]. ARGV: the client's offset (-1: none), its epoch,
/// ttl_s, meta_ttl_s. Returns {epoch, offset, 1 if recovered, entries…};
/// the entries keep their `OFFSET:UNIX_S:` heads (stripped by the node:
/// Redis's CPU is the cluster's shared one). Writes nothing: a topic
/// without a position is at offset 0 of the epoch its first publication
/// will have.
const RECOVER_BODY: &str = r#"local m=redis.call('HMGET',KEYS[2],'e','o')
local e=m[1]
local since=tonumber(ARGV[1])
if not e then
e=epoch_of(KEYS[2])
if since==0 and ARGV[2]==e then return {e,0,1} end
return {e,0,0}
end
local top=tonumber(m[2])
if since<0 or ARGV[2]~=e or since>top then return {e,top,0} end
if since==top then return {e,top,1} end
local items=redis.call('LRANGE',KEYS[1],-(top-since),-1)
if #items<top-since then return {e,top,0} end
local o,at=string.match(items[1],'^(%d+):(%d+):')
if tonumber(o)~=since+1 or tonumber(at)+tonumber(ARGV[3])<=tonumber(t[1]) then return {e,top,0} end
table.insert(items,1,1)
table.insert(items,1,top)
table.insert(items,1,e)
return items"#;

/// [`APPEND_BODY`] with what it expects.
pub(crate) static APPEND: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("local t=redis.call('TIME')\nlocal mttl=tonumber(ARGV[5])\n{EPOCH}{APPEND_BODY}")
});

/// [`RECOVER_BODY`] with what it expects.
static RECOVER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("local t=redis.call('TIME')\nlocal mttl=tonumber(ARGV[4])\n{EPOCH}{RECOVER_BODY}")
});

impl Cluster {
    /// The keys of `topic`'s history: (the list, the position).
    pub(crate) fn history_keys(&self, topic: &str) -> (String, String) {
        let tagged = Cluster::tag(topic);
        (self.key(&["h", &tagged]), self.key(&["hm", &tagged]))
    }

    /// `topic`'s position and, when asked, the publications after
    /// `since`. Writes nothing to Redis.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis fails, is too slow, or answers what
    /// gale did not write.
    pub async fn recover(
        &self,
        topic: &str,
        ttl_s: u64,
        meta_ttl_s: u64,
        since: Option<&Since>,
    ) -> Result<Recovery, ClusterError> {
        let (list, meta) = self.history_keys(topic);
        let mut inv = self.scripts.recover.key(list);
        inv.key(meta);
        match since {
            Some(s) => inv.arg(s.offset).arg(&s.epoch),
            None => inv.arg(-1).arg(""),
        };
        inv.arg(ttl_s).arg(meta_ttl_s);
        let reply: Vec<Value> = self.script(inv).await?;
        let bad = || {
            ClusterError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "unexpected history reply",
            )))
        };
        let mut it = reply.into_iter();
        let (Some(epoch), Some(offset), Some(ok)) = (it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        let epoch = String::from_redis_value(epoch).map_err(|_| bad())?;
        let offset = u64::from_redis_value(offset).map_err(|_| bad())?;
        let ok = i64::from_redis_value(ok).map_err(|_| bad())? == 1;
        let publications = if ok && since.is_some() {
            let texts: Result<Vec<Prepared>, ClusterError> = it
                .map(|v| {
                    let entry = String::from_redis_value(v).map_err(|_| bad())?;
                    // OFFSET:UNIX_S:TEXT
                    let text = entry.splitn(3, ':').nth(2).ok_or_else(bad)?;
                    Ok(Prepared::new(text))
                })
                .collect();
            Some(texts?)
        } else {
            None
        };
        Ok(Recovery {
            position: Position {
                offset,
                epoch: Arc::from(epoch),
            },
            publications,
        })
    }
}

pub(crate) fn recover_script() -> redis::Script {
    redis::Script::new(&RECOVER)
}
