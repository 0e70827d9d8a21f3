//! `[source]`'s reading settings: the event format (JSON or Avro through a registry), unknown
//! tables, control records, size and time limits.

use super::*;

/// What to do with events of a table that no policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTables {
    /// Count and drop.
    Skip,
    /// Count and write to the quarantine (encrypted).
    Quarantine,
}

/// What to do with records that are not row changes (transaction metadata, heartbeats,
/// schema changes, logical decoding messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlRecords {
    /// Count by kind and skip.
    Skip,
    /// Count by kind and write to the quarantine (encrypted).
    Quarantine,
}

/// How a message's bytes encode a change event.
#[derive(Debug, Clone, Default)]
pub enum InputFormat {
    /// Debezium's JSON converter, with or without the schema.
    #[default]
    Json,
    /// Confluent-framed Avro, writer schemas from a Schema Registry (Kafka sources).
    Avro(RegistryConfig),
}

/// `[source.schema_registry]`: where writer schemas are fetched and the names of the
/// environment variables holding the credentials (read when a run starts).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub url: String,
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub token_env: Option<String>,
    pub ca_file: Option<PathBuf>,
}

impl RegistryConfig {
    /// The client settings, credentials read from the environment now.
    pub fn settings(&self) -> Result<RegistrySettings, sluice_connectors::secret::SecretError> {
        Ok(RegistrySettings {
            url: self.url.clone(),
            auth: registry_auth(
                self.username_env.as_deref(),
                self.password_env.as_deref(),
                self.token_env.as_deref(),
            )?,
            ca_file: self.ca_file.clone(),
        })
    }
}

/// How events are read, whatever their source: the decoding keys of `[source]`.
#[derive(Debug, Clone)]
pub struct InputSettings {
    pub format: InputFormat,
    pub unknown_tables: UnknownTables,
    pub control_records: ControlRecords,
    pub max_event_bytes: usize,
    pub decode: DecodeOptions,
    /// What Debezium writes for a value it did not capture (an unchanged TOAST column):
    /// its `unavailable.value.placeholder`.
    pub unavailable_placeholder: String,
}

impl Default for InputSettings {
    fn default() -> Self {
        Self {
            format: InputFormat::Json,
            unknown_tables: UnknownTables::Skip,
            control_records: ControlRecords::Skip,
            max_event_bytes: default_max_event_bytes(),
            decode: DecodeOptions::default(),
            unavailable_placeholder: DEFAULT_UNAVAILABLE_PLACEHOLDER.into(),
        }
    }
}

/// Debezium's default `unavailable.value.placeholder`.
pub const DEFAULT_UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// How events are read: format, unknown tables, control records, size and time limits.
pub(super) fn input_settings(
    raw: &RawConfig,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<InputSettings, LoadError> {
    Ok(InputSettings {
        format: input_format(&raw.source, &resolve, &invalid)?,
        unknown_tables: raw.unknown_tables,
        control_records: raw.source.control_records.unwrap_or(ControlRecords::Skip),
        max_event_bytes: raw.source.max_event_bytes.max(defaults::MIN_MAX_EVENT_BYTES),
        decode: DecodeOptions {
            event_time_window_ms: match &raw.source.event_time_window {
                None => DecodeOptions::DEFAULT_EVENT_TIME_WINDOW_MS,
                Some(w) => event_time_window(w.get_ref()).ok_or_else(|| {
                    invalid(
                        w.span().start,
                        "source.event_time_window",
                        "expected [from, to]: two RFC 3339 dates or times, from before to".into(),
                    )
                })?,
            },
            time_optional: false,
        },
        unavailable_placeholder: match &raw.source.unavailable_value_placeholder {
            None => DEFAULT_UNAVAILABLE_PLACEHOLDER.into(),
            Some(p) if p.get_ref().is_empty() => {
                return Err(invalid(
                    p.span().start,
                    "source.unavailable_value_placeholder",
                    "must not be empty".into(),
                ))
            }
            Some(p) => p.get_ref().clone(),
        },
    })
}

pub(super) fn input_format(
    raw: &RawSource,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<InputFormat, LoadError> {
    let format = raw.format.as_ref().map(|f| (f.get_ref().as_str(), f.span().start));
    match (format, &raw.schema_registry) {
        (None | Some(("json", _)), None) => Ok(InputFormat::Json),
        (None | Some(("json", _)), Some(r)) => Err(invalid(
            r.url.span().start,
            "source.schema_registry",
            "set, but `source.format` is not \"avro\"".into(),
        )),
        (Some(("avro", at)), registry) => {
            if raw.kind.get_ref() != "kafka" {
                return Err(invalid(
                    at,
                    "source.format",
                    "\"avro\" is read from Kafka sources only".into(),
                ));
            }
            let Some(r) = registry else {
                return Err(invalid(
                    at,
                    "source.schema_registry",
                    "\"avro\" needs [source.schema_registry] url".into(),
                ));
            };
            let at = r.url.span().start;
            let url = r.url.get_ref();
            let Some(authority) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
                return Err(invalid(
                    at,
                    "source.schema_registry.url",
                    "expected an http:// or https:// URL".into(),
                ));
            };
            // The URL is printed in errors: credentials in it would be too.
            if authority.split('/').next().is_some_and(|host| host.contains('@')) {
                return Err(invalid(
                    at,
                    "source.schema_registry.url",
                    "credentials belong in username_env/password_env or token_env, not in the URL".into(),
                ));
            }
            match (&r.username_env, &r.password_env, &r.token_env) {
                (Some(_), None, _) | (None, Some(_), _) => {
                    return Err(invalid(
                        at,
                        "source.schema_registry",
                        "basic auth needs both username_env and password_env".into(),
                    ))
                }
                (Some(_), Some(_), Some(_)) => {
                    return Err(invalid(
                        at,
                        "source.schema_registry.token_env",
                        "either basic auth (username_env, password_env) or a bearer token, not both".into(),
                    ))
                }
                _ => {}
            }
            Ok(InputFormat::Avro(RegistryConfig {
                url: r.url.get_ref().clone(),
                username_env: r.username_env.clone(),
                password_env: r.password_env.clone(),
                token_env: r.token_env.clone(),
                ca_file: r.ca_file.as_deref().map(resolve),
            }))
        }
        (Some((other, at)), _) => Err(invalid(
            at,
            "source.format",
            format!("unknown format `{other}`: \"json\" or \"avro\""),
        )),
    }
}

/// `[from, to)` in milliseconds since the epoch.
pub(super) fn event_time_window(bounds: &[String]) -> Option<(i64, i64)> {
    let [from, to] = bounds else { return None };
    let ms = |t: &str| sluice_transforms::functions::parse_timestamp_micros(t, None).map(|us| us.div_euclid(1000));
    // Integers would be read as epochs: the window is written as dates or times.
    if bounds.iter().any(|b| b.trim().parse::<i64>().is_ok()) {
        return None;
    }
    let (from, to) = (ms(from)?, ms(to)?);
    (from < to).then_some((from, to))
}
