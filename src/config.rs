//! The shipped server's configuration: the engine's sections
//! ([`gale_engine::config::Config`]) and the applications' own,
//! `[weather]` and `[store]`, from one file and one set of `GALE_*`
//! variables. Precedence, lowest first: defaults < `--config FILE` <
//! `WEATHER_API_KEY` < `GALE_<SECTION>__<KEY>` variables.

use std::ops::{Deref, DerefMut};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use gale_engine::config::*;
pub use gale_store::{MAX_BATCH_SIZE, StoreConfig};
pub use gale_weather::config::{API_KEY_ENV, Provider, WeatherConfig};

/// The applications' sections of `gale.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Apps {
    weather: WeatherConfig,
    store: StoreConfig,
}

impl Sections for Apps {
    fn validate(&self, _engine: &gale_engine::config::Config) -> Result<(), ConfigError> {
        self.weather.validate()?;
        self.store.validate()
    }
}

/// The whole configuration: the engine's sections (reached through it as
/// `config.server`, `config.topics`, …) and the applications'.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The engine's sections.
    pub engine: gale_engine::config::Config,
    /// The upstream weather provider and its protections.
    pub weather: WeatherConfig,
    /// The request log and notes database.
    pub store: StoreConfig,
}

/// Written out as one file (the engine's sections, then the
/// applications'), as `gale.example.toml` is.
impl Serialize for Config {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Whole<'a> {
            #[serde(flatten)]
            engine: &'a gale_engine::config::Config,
            weather: &'a WeatherConfig,
            store: &'a StoreConfig,
        }
        Whole {
            engine: &self.engine,
            weather: &self.weather,
            store: &self.store,
        }
        .serialize(s)
    }
}

impl Deref for Config {
    type Target = gale_engine::config::Config;

    fn deref(&self) -> &Self::Target {
        &self.engine
    }
}

impl DerefMut for Config {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.engine
    }
}

impl Config {
    /// Loads the configuration: defaults, then `file` if given, then the
    /// process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, variable or setting at fault.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, variable or setting at fault.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (engine, apps) = gale_engine::config::Config::load_with::<Apps>(file, with_key(env))?;
        Ok(Config::of(engine, apps))
    }

    /// As [`Config::load_from`], from a file's text rather than its path
    /// (errors name the file as `path`). What the config fuzz target runs.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the line, variable or setting at fault.
    pub fn from_text(
        text: &str,
        path: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (engine, apps) =
            gale_engine::config::Config::from_text_with::<Apps>(text, path, with_key(env))?;
        Ok(Config::of(engine, apps))
    }

    /// Checks values that parse but cannot work, in every section.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.engine.validate()?;
        self.weather.validate()?;
        self.store.validate()
    }

    fn of(engine: gale_engine::config::Config, apps: Apps) -> Config {
        Config {
            engine,
            weather: apps.weather,
            store: apps.store,
        }
    }
}

/// The environment with the seed's `WEATHER_API_KEY` as the setting it
/// stands for, `weather.api_key`; a `GALE_WEATHER__API_KEY` beside it wins.
fn with_key(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = env.into_iter().collect();
    let explicit = vars.iter().any(|(k, _)| k == "GALE_WEATHER__API_KEY");
    let seed = vars
        .iter()
        .find(|(k, v)| k == API_KEY_ENV && !v.is_empty())
        .map(|(_, v)| v.clone());
    if let (false, Some(key)) = (explicit, seed) {
        vars.push(("GALE_WEATHER__API_KEY".to_owned(), key));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn errors_speak_of_whole_numbers_addresses_and_the_variable_typed() {
        let err = |text: &str| {
            Config::from_text(text, "gale.toml", env(&[]))
                .expect_err("refused")
                .to_string()
        };
        let e = err("[server]\nmax_connections = \"many\"");
        assert!(
            e.contains("server.max_connections") && e.contains("a whole number"),
            "{e}"
        );
        assert!(!e.contains("usize"), "{e}");
        let e = err("[store]\nworkers = -1");
        assert!(e.contains("a whole number") && !e.contains("usize"), "{e}");
        let e = err("[router]\nalert_threshold = \"x\"");
        assert!(e.contains("a number") && !e.contains("f64"), "{e}");
        let e = err("[server]\nlisten = 8080");
        assert!(e.contains("an address like \"127.0.0.1:8080\""), "{e}");
        let e = err("[server]\nlistn = \"127.0.0.1:1\"");
        assert!(e.contains("did you mean server.listen?"), "{e}");

        let e = Config::load_from(None, env(&[("GALE_SERVER__LISTN", "127.0.0.1:1")]))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("GALE_SERVER__LISTN"),
            "names the variable typed: {e}"
        );
        assert!(e.contains("did you mean server.listen?"), "{e}");
        let e = Config::load_from(None, env(&[("GALE_SERVR__LISTEN", "127.0.0.1:1")]))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("GALE_SERVR__LISTEN"), "{e}");
        let e = Config::load_from(None, env(&[("GALE_STORE__WORKERS", "five")]))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("a whole number"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.max_message_bytes, 131_072);
        assert_eq!(c.server.max_outbound_message_bytes, 1_048_576);
        assert_eq!(c.weather.provider, Provider::OpenMeteo);
        assert_eq!(c.weather.timeout_ms, 5_000);
        assert_eq!(c.weather.max_concurrent, 1_000);
        assert_eq!(c.weather.max_pending, 5_000);
        assert_eq!(c.weather.cache_ttl_s, 600);
        assert_eq!(c.store.url, "sqlite://gale.db");
        assert_eq!(c.store.queue_size, 10_000);
        assert_eq!(c.store.workers, 5);
    }

    #[test]
    fn a_proxy_topic_needs_its_backend_url() {
        let file = "[topics.\"room:*\"]\nsubscribe = \"proxy\"\n";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.toml");
        std::fs::write(&path, file).expect("write");
        let e = Config::load_from(Some(&path), env(&[]))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("proxy.subscribe_url"), "{e}");
        std::fs::write(
            &path,
            format!("{file}[proxy]\nsubscribe_url = \"http://127.0.0.1:1/s\"\n"),
        )
        .expect("write");
        assert!(Config::load_from(Some(&path), env(&[])).is_ok());
    }

    #[test]
    fn env_overrides_use_the_type_of_the_default() {
        let c = Config::load_from(
            None,
            env(&[
                ("GALE_SERVER__LISTEN", "0.0.0.0:9000"),
                ("GALE_STORE__WORKERS", "3"),
                ("GALE_WEATHER__PROVIDER", "openweathermap"),
                ("GALE_WEATHER__API_KEY", "12345"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.server.listen, "0.0.0.0:9000");
        assert_eq!(c.store.workers, 3);
        assert_eq!(c.weather.provider, Provider::OpenWeatherMap);
        assert_eq!(c.weather.api_key.as_deref(), Some("12345"));
    }

    #[test]
    fn fanout_threads_is_auto_a_count_or_a_clear_error() {
        let c = Config::load_from(None, env(&[])).expect("loads");
        assert_eq!(c.broadcast.fanout_threads, Threads::Auto);
        for (value, want) in [
            ("0", Threads::Count(0)),
            ("3", Threads::Count(3)),
            ("auto", Threads::Auto),
            (" AUTO ", Threads::Auto),
        ] {
            let c = Config::load_from(None, env(&[("GALE_BROADCAST__FANOUT_THREADS", value)]))
                .unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(c.broadcast.fanout_threads, want, "{value:?}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gale.toml");
        for (toml, want) in [
            ("2", Some(Threads::Count(2))),
            ("\"auto\"", Some(Threads::Auto)),
            ("-1", None),
            ("\"many\"", None),
            ("5000", None),
        ] {
            std::fs::write(&path, format!("[broadcast]\nfanout_threads = {toml}\n"))
                .expect("write");
            match (Config::load_from(Some(&path), env(&[])), want) {
                (Ok(c), Some(want)) => assert_eq!(c.broadcast.fanout_threads, want, "{toml}"),
                (Err(e), None) => assert!(
                    e.to_string().contains("broadcast.fanout_threads"),
                    "{toml}: {e}"
                ),
                (got, _) => panic!("{toml}: {got:?}"),
            }
        }
        for bad in ["-1", "x"] {
            let err = Config::load_from(None, env(&[("GALE_BROADCAST__FANOUT_THREADS", bad)]))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("expected \"auto\" or a whole number of threads"),
                "{err}"
            );
        }
    }

    #[test]
    fn seed_api_key_variable_sets_the_key_and_gale_variable_wins() {
        let c = Config::load_from(None, env(&[("WEATHER_API_KEY", "seed")])).expect("loads");
        assert_eq!(c.weather.api_key.as_deref(), Some("seed"));
        let c = Config::load_from(
            None,
            env(&[
                ("WEATHER_API_KEY", "seed"),
                ("GALE_WEATHER__API_KEY", "mine"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.weather.api_key.as_deref(), Some("mine"));
    }

    #[test]
    fn errors_name_the_setting() {
        let cases: &[(&str, &str, &str)] = &[
            ("GALE_WEATHER__PROVIDER", "darksky", "weather.provider"),
            ("GALE_WEATHER__BASE_URL", "not a url", "weather.base_url"),
            ("GALE_STORE__WORKERS", "0", "store.workers"),
            ("GALE_STORE__URL", "mysql://x", "store.url"),
            (
                "GALE_STORE__BATCH_WINDOW_MS",
                "5000",
                "store.batch_window_ms",
            ),
            ("GALE_SERVER__NO_SUCH_KEY", "1", "server"),
        ];
        for (var, value, key) in cases {
            let err = Config::load_from(None, env(&[(var, value)]))
                .expect_err(&format!("{var}={value} must be refused"))
                .to_string();
            assert!(err.contains(key), "{err:?} should name {key}");
            assert!(!err.contains('\n'), "{err:?} should be one line");
        }
        let err = Config::load_from(None, env(&[("GALE_STORE__WORKERS", "five")]))
            .expect_err("not a number")
            .to_string();
        assert!(err.contains("GALE_STORE__WORKERS"), "{err}");
    }

    #[test]
    fn other_gale_variables_are_ignored_and_near_misses_explained() {
        let c = Config::load_from(
            None,
            env(&[
                ("GALE_TEST_DATABASE_URL", "postgres://x"),
                ("GALE_HOME", "/x"),
            ]),
        )
        .expect("not ours: ignored");
        assert_eq!(c.server.listen, "127.0.0.1:8080");

        let err = Config::load_from(None, env(&[("GALE_SERVER_LISTEN", "0.0.0.0:1")]))
            .expect_err("typo")
            .to_string();
        assert!(err.contains("GALE_SERVER__LISTEN"), "{err}");

        let err = Config::load_from(None, env(&[("GALE_SERVR__LISTEN", "0.0.0.0:1")]))
            .expect_err("unknown section")
            .to_string();
        assert!(err.contains("servr"), "{err}");
    }

    #[test]
    fn openweathermap_needs_a_key() {
        let err = Config::load_from(None, env(&[("GALE_WEATHER__PROVIDER", "openweathermap")]))
            .expect_err("no key")
            .to_string();
        assert!(err.contains("weather.api_key"), "{err}");
    }

    #[test]
    fn file_values_and_syntax_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gale.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nworkers = 2\n",
        )
        .expect("write");
        let c = Config::load_from(Some(&path), env(&[("GALE_STORE__WORKERS", "4")])).expect("ok");
        assert_eq!(c.server.listen, "127.0.0.1:0");
        assert_eq!(c.store.workers, 4, "environment beats the file");

        std::fs::write(&path, "[server]\nlisten = \n").expect("write");
        let err = Config::load_from(Some(&path), env(&[]))
            .expect_err("syntax")
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains('\n'), "{err:?}");

        // The same from text, as the config fuzz target loads it.
        let c = Config::from_text("[store]\nworkers = 2\n", "t.toml", env(&[])).expect("ok");
        assert_eq!(c.store.workers, 2);
        let err = Config::from_text("[server]\nlisten = \n", "t.toml", env(&[]))
            .expect_err("syntax")
            .to_string();
        assert!(err.contains("t.toml") && err.contains("line 2"), "{err}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The shipped example must list every key with its real default, so
    /// it cannot drift from the code.
    #[test]
    fn example_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gale.example.toml");
        let loaded = Config::load_from(Some(&path), Vec::new()).expect("example loads");
        let as_toml = |c: &Config| toml::to_string(c).expect("serialise");
        assert_eq!(as_toml(&loaded), as_toml(&Config::default()));

        // Every key of every section appears in the file, set or commented.
        let text = std::fs::read_to_string(&path).expect("read");
        let defaults = toml::Table::try_from(Config::default()).expect("table");
        let optional = [
            "base_url",
            "geocoding_url",
            "api_key",
            "jwt_secret",
            "jwt_public_key_file",
            "key",
            "redis_url",
            "node_id",
            "tls_cert",
            "tls_key",
        ];
        for (section, keys) in &defaults {
            if section == "events" {
                assert!(
                    text.contains("# [events.\"weather.get\"]"),
                    "events example missing"
                );
                continue;
            }
            if section == "topics" {
                assert!(text.contains("# [topics.\""), "topics example missing");
                continue;
            }
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing"
            );
            for key in keys.as_table().expect("section").keys().map(String::as_str) {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{section}.{key} missing from gale.example.toml"
                );
            }
        }
        for key in optional {
            assert!(text.contains(&format!("# {key} = ")), "{key} missing");
        }
    }

    /// Every shipped event has a commented block in the example holding
    /// exactly its built-in policy.
    #[tokio::test]
    async fn example_config_shows_every_event_with_its_built_in_policy() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gale.example.toml");
        let text = std::fs::read_to_string(&path).expect("read");
        // The shipped server's events: the engine's and every
        // application's, as the binary installs them.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.store.url = format!("sqlite://{}", dir.path().join("g.db").display());
        config.store.spill_dir = dir.path().join("spill").display().to_string();
        let mut builder = crate::server::builder(config).await.expect("builds");
        let registry = builder.registry();
        let mut seen = 0;
        for (name, policy) in registry.policies() {
            let head = format!("# [events.\"{name}\"]\n");
            let at = text
                .find(&head)
                .unwrap_or_else(|| panic!("{name} missing from gale.example.toml"));
            let block: String = text[at + head.len()..]
                .lines()
                .take_while(|l| l.starts_with("# ") && !l.starts_with("# ["))
                .map(|l| format!("{}\n", &l[2..]))
                .collect();
            let shown: EventOverride = toml::from_str(&block).expect("a block parses");
            let rate = match policy.rate_limit {
                None => "off".to_owned(),
                Some(r) => {
                    let unit = match r.per.as_secs() {
                        1 => "s",
                        60 => "min",
                        _ => "h",
                    };
                    format!("{}/{unit}", r.count)
                }
            };
            assert_eq!(shown.rate_limit.as_deref(), Some(rate.as_str()), "{name}");
            assert_eq!(
                shown.timeout_ms,
                Some(policy.timeout.as_millis() as u64),
                "{name}"
            );
            assert_eq!(shown.priority, Some(policy.priority), "{name}");
            assert_eq!(shown.requires_auth, Some(policy.requires_auth), "{name}");
            assert_eq!(
                shown.requires_role.as_deref(),
                Some(policy.requires_role.as_deref().unwrap_or("")),
                "{name}"
            );
            seen += 1;
        }
        assert!(seen >= 9, "{seen} events");
    }
}
