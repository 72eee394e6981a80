//! Topic history in Redis, shared by every node (see `crate::history` for
//! the model). A topic with history has two keys with the same hash tag,
//! so each script runs on the one Redis (Cluster) node owning them:
//!
//! - `P:hm:{TOPIC}`, a HASH: `e` the epoch, `o` the last offset. It
//!   expires `history.meta_ttl_s` after the last publication; a new one
//!   gets a new epoch.
//! - `P:h:{TOPIC}`, a LIST of the last `history_size` publications, each
//!   `OFFSET:UNIX_SECONDS:TEXT`, expiring `history_ttl_s` after the last.
//!
//! A publication is appended and published in one script ([`APPEND`]):
//! the offset is taken, the positioned text built, stored and sent to the
//! topic's channel with an empty origin, so every node delivers it, this
//! one included, in the order Redis gave. Appends travel in the
//! backplane's pipelines, as `EVAL` (no script cache to keep in step on
//! every Redis node). A recovery ([`RECOVER`]) reads the position and the
//! publications after the client's in one step.

use std::sync::Arc;

use redis::{FromRedisValue, Value};

use super::{Cluster, ClusterError};
use crate::history::{Position, Recovery, Since};
use crate::websocket::Prepared;

/// KEYS[1]: the list, KEYS[2]: the position. ARGV: the channel, the push
/// with its topic, without its closing brace ([`crate::history::head`]), size, ttl_s, meta_ttl_s. Returns the offset.
pub(crate) const APPEND: &str = r#"local t=redis.call('TIME')
local e=redis.call('HGET',KEYS[2],'e')
if not e then
e=string.format('%x%05x',tonumber(t[1]),tonumber(t[2]))
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
/// Redis's CPU is the cluster's shared one).
const RECOVER: &str = r#"local m=redis.call('HMGET',KEYS[2],'e','o')
local e=m[1]
if not e then
local t=redis.call('TIME')
e=string.format('%x%05x',tonumber(t[1]),tonumber(t[2]))
redis.call('HSET',KEYS[2],'e',e,'o',0)
redis.call('EXPIRE',KEYS[2],ARGV[4])
redis.call('DEL',KEYS[1])
return {e,0,0}
end
local top=tonumber(m[2])
local since=tonumber(ARGV[1])
if since<0 or ARGV[2]~=e or since>top then return {e,top,0} end
if since==top then return {e,top,1} end
local items=redis.call('LRANGE',KEYS[1],-(top-since),-1)
if #items<top-since then return {e,top,0} end
local o,at=string.match(items[1],'^(%d+):(%d+):')
local now=tonumber(redis.call('TIME')[1])
if tonumber(o)~=since+1 or tonumber(at)+tonumber(ARGV[3])<=now then return {e,top,0} end
table.insert(items,1,1)
table.insert(items,1,top)
table.insert(items,1,e)
return items"#;

impl Cluster {
    /// The keys of `topic`'s history: (the list, the position).
    pub(crate) fn history_keys(&self, topic: &str) -> (String, String) {
        let tagged = format!("{{{topic}}}");
        (self.key(&["h", &tagged]), self.key(&["hm", &tagged]))
    }

    /// `topic`'s position, creating it if it has none, and the
    /// publications after `since` when asked.
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
    redis::Script::new(RECOVER)
}
