//! Channels: who may subscribe to and publish on which topics, from the
//! `[topics."PATTERN"]` blocks, decided before the hub is asked.
//!
//! Each setting of a topic comes from the most specific block that sets
//! it: an exact name first, then patterns, longest first (a block that
//! leaves a setting out leaves it to the next block that matches). So
//! `[topics."*"] subscribe = "anyone"` opens every topic, and
//! `[topics."news:*"] history_size = 10` adds history to some of them
//! without closing them again.
//!
//! A topic no block opens is closed to clients: `subscribe` and
//! `publish` default to nobody, so a new deployment never exposes its
//! topics by accident. The backend reaches every topic whatever the
//! blocks say (the server API, server-side subscriptions at connect).
//!
//! Whatever a block says, a topic whose name holds `#` is limited to the
//! users listed after it, comma-separated: `dm:#alice,bob` may be
//! subscribed to by alice and bob only (Centrifugo's convention): the
//! name narrows who may, and the block that matches it (`[topics."dm:*"]
//! subscribe = "users"`) still decides for them, roles, tokens and the
//! backend included; a closed topic stays closed.

use std::collections::HashMap;

use crate::config::{PublishMode, SubscribeMode, TopicConfig};
use crate::protocol::{ErrorBody, ErrorCode};

/// Who a topic is open to, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Who may subscribe from a client.
    pub subscribe: SubscribeMode,
    /// Who may publish from a client (`topic.publish`).
    pub publish: PublishMode,
    /// Subscribers hear `topic.join` and `topic.leave`.
    pub join_leave: bool,
    /// `topic.presence` answers who is subscribed.
    pub presence: bool,
    /// Roles a subscriber or publisher needs one of (none: no role).
    pub roles: Vec<String>,
}

/// The `[topics."PATTERN"]` blocks, resolved per setting.
#[derive(Debug, Default, Clone)]
pub struct Rules {
    exact: HashMap<String, TopicConfig>,
    /// Patterns with `*`, longest first.
    patterns: Vec<(String, TopicConfig)>,
}

impl Rules {
    /// The rules of `topics`.
    pub fn new<'a>(topics: impl IntoIterator<Item = (&'a String, &'a TopicConfig)>) -> Rules {
        let mut r = Rules::default();
        for (name, t) in topics {
            if name.contains('*') {
                r.patterns.push((name.clone(), t.clone()));
            } else {
                r.exact.insert(name.clone(), t.clone());
            }
        }
        r.patterns.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        r
    }

    /// The blocks that match `topic`, most specific first.
    fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a TopicConfig> + 'a {
        self.exact.get(topic).into_iter().chain(
            self.patterns
                .iter()
                .filter(move |(p, _)| crate::history::matches(p, topic))
                .map(|(_, t)| t),
        )
    }

    /// The value of one setting for `topic`: from the most specific block
    /// that sets it.
    fn setting<T>(&self, topic: &str, pick: impl Fn(&TopicConfig) -> Option<T>) -> Option<T> {
        self.matching(topic).find_map(pick)
    }

    /// `topic`'s channel.
    pub fn channel(&self, topic: &str) -> Channel {
        Channel {
            subscribe: self
                .setting(topic, |t| t.subscribe)
                .unwrap_or(SubscribeMode::Nobody),
            publish: self
                .setting(topic, |t| t.publish)
                .unwrap_or(PublishMode::Nobody),
            join_leave: self.setting(topic, |t| t.join_leave).unwrap_or(false),
            presence: self.setting(topic, |t| t.presence).unwrap_or(false),
            roles: self.setting(topic, |t| t.roles.clone()).unwrap_or_default(),
        }
    }

    /// The blocks that open something to clients, as `PATTERN (subscribe
    /// MODE, publish MODE)`, for the start-up log; empty when every topic
    /// is closed.
    pub fn open(&self) -> Vec<String> {
        let mut open: Vec<String> = self
            .exact
            .iter()
            .chain(self.patterns.iter().map(|(p, t)| (p, t)))
            .filter_map(|(name, t)| {
                let mut what = Vec::new();
                if let Some(m) = t.subscribe.filter(|m| *m != SubscribeMode::Nobody) {
                    what.push(format!("subscribe {m:?}").to_lowercase());
                }
                if let Some(m) = t.publish.filter(|m| *m != PublishMode::Nobody) {
                    what.push(format!("publish {m:?}").to_lowercase());
                }
                (!what.is_empty()).then(|| format!("{name} ({})", what.join(", ")))
            })
            .collect();
        open.sort();
        open
    }
}

/// The users a user-limited topic (`dm:#alice,bob`) is for; `None` when
/// the name holds no `#`.
pub(crate) fn limited_to(topic: &str) -> Option<impl Iterator<Item = &str>> {
    let (_, users) = topic.split_once('#')?;
    Some(users.split(',').filter(|u| !u.is_empty()))
}

/// The refusal of a user-limited topic (`dm:#alice,bob`) to whoever its
/// name does not list; `None` for a listed user or an unlimited name.
fn unlisted(topic: &str, who: Asker<'_>) -> Option<Decision> {
    let mut users = limited_to(topic)?;
    (!who.user.is_some_and(|u| users.any(|l| l == u)))
        .then(|| denied(format!("{topic} is limited to the users its name lists")))
}

/// Who asks, as the rules see them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asker<'a> {
    /// The signed-in user.
    pub user: Option<&'a str>,
    /// Their roles.
    pub roles: &'a [String],
    /// Whether the connection is subscribed to the topic (for publish =
    /// "subscribers").
    pub subscribed: bool,
}

/// What the rules decide before anyone else is asked.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Allowed.
    Allow,
    /// Refused, with what the client is told.
    Deny(ErrorBody),
    /// A subscription token is needed (subscribe = "token").
    Token,
    /// The backend decides (subscribe or publish = "proxy").
    Proxy,
}

fn denied(message: String) -> Decision {
    Decision::Deny(ErrorBody::new(ErrorCode::PermissionDenied, message))
}

/// The roles check: a role is needed and the asker has none of them.
fn missing_role(channel: &Channel, topic: &str, who: Asker<'_>) -> Option<Decision> {
    if channel.roles.is_empty() || channel.roles.iter().any(|r| who.roles.contains(r)) {
        return None;
    }
    let what = if channel.roles.len() == 1 {
        format!("the role {:?}", channel.roles[0])
    } else {
        format!("one of the roles {:?}", channel.roles)
    };
    Some(Decision::Deny(ErrorBody::new(
        ErrorCode::Forbidden,
        format!("{topic} needs {what}"),
    )))
}

/// Whether `who` may subscribe to `topic` on `channel` (a subscription
/// token, when one comes, is checked by the caller first: it grants the
/// subscription whatever this says).
pub(crate) fn may_subscribe(channel: &Channel, topic: &str, who: Asker<'_>) -> Decision {
    // The name only narrows who may: the block's mode and roles still
    // apply to the users it lists (a closed topic stays closed).
    if let Some(d) = unlisted(topic, who) {
        return d;
    }
    if let Some(d) = missing_role(channel, topic, who) {
        return d;
    }
    match channel.subscribe {
        SubscribeMode::Anyone => Decision::Allow,
        SubscribeMode::Users if who.user.is_some() => Decision::Allow,
        SubscribeMode::Users => denied(format!(
            "{topic} is for signed-in users: sign in first (a token, or the connect proxy)"
        )),
        SubscribeMode::Token => Decision::Token,
        SubscribeMode::Proxy => Decision::Proxy,
        SubscribeMode::Nobody => denied(format!(
            "{topic} is not open to clients (no [topics] block allows subscribing to it)"
        )),
    }
}

/// Whether `who` may publish on `topic` from a client.
pub(crate) fn may_publish(channel: &Channel, topic: &str, who: Asker<'_>) -> Decision {
    // A user-limited topic takes publications from its users only,
    // unless the backend decides (an inbox anyone may knock on, say).
    if channel.publish != PublishMode::Proxy
        && let Some(d) = unlisted(topic, who)
    {
        return d;
    }
    if let Some(d) = missing_role(channel, topic, who) {
        return d;
    }
    match channel.publish {
        PublishMode::Nobody => denied(format!(
            "{topic} takes no publications from clients (no [topics] block allows publishing on it)"
        )),
        PublishMode::Subscribers if who.subscribed => Decision::Allow,
        PublishMode::Subscribers => denied(format!("subscribe to {topic} before publishing on it")),
        PublishMode::Users if who.user.is_some() => Decision::Allow,
        PublishMode::Users => denied(format!("{topic} takes publications from signed-in users")),
        PublishMode::Proxy => Decision::Proxy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(blocks: &[(&str, &str)]) -> Rules {
        let topics: std::collections::BTreeMap<String, TopicConfig> = blocks
            .iter()
            .map(|(k, v)| ((*k).to_owned(), toml::from_str(v).expect("block")))
            .collect();
        Rules::new(topics.iter())
    }

    fn anon() -> Asker<'static> {
        Asker {
            user: None,
            roles: &[],
            subscribed: false,
        }
    }

    #[test]
    fn undeclared_topics_are_closed_and_settings_come_from_the_most_specific_block() {
        let r = rules(&[
            ("*", r#"subscribe = "anyone""#),
            (
                "news:*",
                "history_size = 10\nhistory_ttl_s = 60\njoin_leave = true",
            ),
            ("news:vip", r#"subscribe = "users""#),
        ]);
        assert_eq!(r.channel("x").subscribe, SubscribeMode::Anyone);
        let news = r.channel("news:eu");
        assert_eq!(news.subscribe, SubscribeMode::Anyone, "left to *");
        assert!(news.join_leave);
        let vip = r.channel("news:vip");
        assert_eq!(vip.subscribe, SubscribeMode::Users);
        assert!(vip.join_leave, "from news:*");
        assert_eq!(vip.publish, PublishMode::Nobody);
        let none = rules(&[]);
        assert_eq!(none.channel("x").subscribe, SubscribeMode::Nobody);
        assert!(none.open().is_empty());
        assert_eq!(
            r.open(),
            vec!["* (subscribe anyone)", "news:vip (subscribe users)"]
        );
    }

    #[test]
    fn user_limited_topics_are_for_their_users_whatever_the_block() {
        let ch = rules(&[("dm:*", r#"subscribe = "anyone""#)]).channel("dm:#alice,bob");
        let alice = Asker {
            user: Some("alice"),
            ..anon()
        };
        let carol = Asker {
            user: Some("carol"),
            ..anon()
        };
        assert_eq!(may_subscribe(&ch, "dm:#alice,bob", alice), Decision::Allow);
        assert!(matches!(
            may_subscribe(&ch, "dm:#alice,bob", carol),
            Decision::Deny(_)
        ));
        assert!(matches!(
            may_subscribe(&ch, "dm:#alice,bob", anon()),
            Decision::Deny(_)
        ));
        // Publishing too, unless the backend decides.
        let open = rules(&[("dm:*", r#"publish = "users""#)]).channel("dm:#alice,bob");
        assert_eq!(may_publish(&open, "dm:#alice,bob", alice), Decision::Allow);
        assert!(matches!(
            may_publish(&open, "dm:#alice,bob", carol),
            Decision::Deny(_)
        ));
        let inbox = rules(&[("inbox:*", r#"publish = "proxy""#)]).channel("inbox:#alice");
        assert_eq!(may_publish(&inbox, "inbox:#alice", carol), Decision::Proxy);
        // The name narrows who may; the block still decides for them.
        let proxied = rules(&[("room:*", r#"subscribe = "proxy""#)]).channel("room:#alice");
        assert_eq!(
            may_subscribe(&proxied, "room:#alice", alice),
            Decision::Proxy
        );
        // It never opens a closed topic.
        let closed = rules(&[]).channel("dm:#alice,bob");
        assert!(matches!(
            may_subscribe(&closed, "dm:#alice,bob", alice),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn roles_refuse_with_forbidden_and_everything_else_with_permission_denied() {
        let r = rules(&[(
            "ops",
            "subscribe = \"users\"\npublish = \"subscribers\"\nroles = [\"admin\"]",
        )]);
        let ch = r.channel("ops");
        let admin = ["admin".to_owned()];
        let user = Asker {
            user: Some("u"),
            roles: &[],
            subscribed: true,
        };
        match may_subscribe(&ch, "ops", user) {
            Decision::Deny(e) => assert_eq!(e.code, ErrorCode::Forbidden),
            d => panic!("{d:?}"),
        }
        let admin_user = Asker {
            roles: &admin,
            ..user
        };
        assert_eq!(may_subscribe(&ch, "ops", admin_user), Decision::Allow);
        assert_eq!(may_publish(&ch, "ops", admin_user), Decision::Allow);
        match may_publish(
            &ch,
            "ops",
            Asker {
                subscribed: false,
                ..admin_user
            },
        ) {
            Decision::Deny(e) => assert_eq!(e.code, ErrorCode::PermissionDenied),
            d => panic!("{d:?}"),
        }
    }
}
