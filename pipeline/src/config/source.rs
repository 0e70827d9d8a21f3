//! `[source]` by kind (files, Kafka, Kinesis, PostgreSQL), and `[publish]` / `[raw_stream]`:
//! read and checked here, with the file's lines in errors; each kind's settings are its
//! connector's (`sluice_connectors::{file, kafka, kinesis, postgres}::*SourceConfig`), which
//! builds the source.

use super::*;

/// Where sanitized rows are also pushed, one JSON message per row keyed by subject token.
#[derive(Debug, Clone)]
pub enum PublishConfig {
    Kafka { settings: KafkaSettings, topic: String },
    Kinesis { settings: KinesisSettings, stream: String },
}

pub(super) fn source_config(
    raw: &RawSource,
    name: &str,
    spool_base: &Path,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<SourceConfig, LoadError> {
    let at = raw.kind.span().start;
    let required = |value: &Option<String>, field: &str| required(value, field, "source", &raw.kind, invalid);
    Ok(match raw.kind.get_ref().as_str() {
        "file" => SourceConfig::File(FileSourceConfig {
            path: resolve(&required(&raw.path, "source.path")?),
            poll_ms: raw.poll_ms,
            follow_symlinks: raw.follow_symlinks,
            fingerprints: spool_base.join("file-streams").join(format!("{name}.json")),
        }),
        "kinesis" => {
            let worker_count = raw.worker_count.unwrap_or(1);
            let worker_index = raw.worker_index.unwrap_or(0);
            if worker_count == 0 || worker_index >= worker_count {
                return Err(invalid(
                    at,
                    "source.worker_index",
                    format!("{worker_index} must be below source.worker_count ({worker_count})"),
                ));
            }
            SourceConfig::Kinesis(KinesisSourceConfig {
                settings: KinesisSettings {
                    region: raw.region.clone(),
                    endpoint: raw.endpoint.clone(),
                },
                stream: required(&raw.stream, "source.stream")?,
                worker_index,
                worker_count,
                start_at: start_at(raw, invalid)?,
                poll_ms: raw.poll_ms,
            })
        }
        "kafka" => {
            let topics = raw.topics.clone().unwrap_or_default();
            if topics.is_empty() {
                return Err(invalid(
                    at,
                    "source.topics",
                    "name at least one topic (or a ^regex)".into(),
                ));
            }
            let start_at = start_at(raw, invalid)?;
            reject_managed_properties(&raw.properties, at, "source.properties", invalid)?;
            SourceConfig::Kafka(KafkaSourceConfig {
                settings: KafkaSettings {
                    brokers: required(&raw.brokers, "source.brokers")?,
                    properties: raw.properties.clone(),
                    security: kafka_security("source", raw.tls.as_ref(), raw.sasl.as_ref(), resolve, invalid)?,
                },
                group_id: required(&raw.group_id, "source.group_id")?,
                topics,
                start_at,
                session_timeout_ms: raw.session_timeout_ms.unwrap_or(defaults::KAFKA_SESSION_TIMEOUT_MS),
            })
        }
        "postgres" => {
            // Slot and publication names: lower-case letters, digits and underscores.
            let default_name = format!("sluice_{}", name.to_ascii_lowercase().replace('-', "_"));
            let slot = raw.slot.clone().unwrap_or_else(|| default_name.clone());
            if slot.is_empty()
                || !slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(invalid(
                    at,
                    "source.slot",
                    format!("`{slot}`: slot names take lower-case letters, digits and underscores"),
                ));
            }
            SourceConfig::Postgres(PostgresSourceConfig {
                host: raw.host.clone().unwrap_or_else(|| defaults::PG_HOST.into()),
                port: raw.port.unwrap_or(defaults::PG_PORT),
                user: required(&raw.user, "source.user")?,
                password_env: raw.password_env.clone(),
                database: required(&raw.database, "source.database")?,
                publication: raw.publication.clone().unwrap_or(default_name),
                slot,
                spool_dir: raw
                    .spool_dir
                    .as_deref()
                    .map(resolve)
                    .unwrap_or_else(|| spool_base.join("spool")),
                heartbeat_ms: raw
                    .heartbeat_ms
                    .unwrap_or(defaults::PG_HEARTBEAT_MS)
                    .max(defaults::MIN_PG_HEARTBEAT_MS),
            })
        }
        other => {
            return Err(invalid(
                at,
                "source.kind",
                format!("unknown source kind `{other}`: expected `file`, `kafka`, `kinesis` or `postgres`"),
            ))
        }
    })
}

/// librdkafka settings sluice sets itself: overriding them would break exactly-once (offsets
/// from Kafka instead of the lake, cooperative rebalancing under an eager handler).
pub(super) const MANAGED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "partition.assignment.strategy",
    "group.protocol",
    "transactional.id",
    // Security has settings of its own (`tls`, `sasl`), with credentials never in this file.
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "ssl.keystore.location",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

/// TLS and SASL of a Kafka section; file paths relative to the config, credentials named only.
pub(super) fn kafka_security(
    section: &str,
    tls: Option<&RawTls>,
    sasl: Option<&RawSasl>,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<KafkaSecurity, LoadError> {
    let tls = tls.map(|t| TlsSettings {
        ca_file: t.ca_file.as_deref().map(resolve),
        cert_file: t.cert_file.as_deref().map(resolve),
        key_file: t.key_file.as_deref().map(resolve),
        key_password_env: t.key_password_env.clone(),
    });
    if let Some(t) = &tls {
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err(invalid(
                0,
                &format!("{section}.tls"),
                "mutual TLS needs both cert_file and key_file".into(),
            ));
        }
    }
    let sasl = match sasl {
        None => None,
        Some(s) => {
            let at = s.mechanism.span().start;
            let mechanism = SaslMechanism::parse(s.mechanism.get_ref()).ok_or_else(|| {
                invalid(
                    at,
                    &format!("{section}.sasl.mechanism"),
                    format!(
                        "unknown mechanism `{}`: one of {}",
                        s.mechanism.get_ref(),
                        SaslMechanism::NAMES.join(", ")
                    ),
                )
            })?;
            let password =
                match (&s.password_env, &s.password_file) {
                    (Some(var), None) => PasswordSource::Env(var.clone()),
                    (None, Some(file)) => PasswordSource::File(resolve(file)),
                    _ => return Err(invalid(
                        at,
                        &format!("{section}.sasl"),
                        "name the password with password_env or password_file (one of them; never the password itself)"
                            .into(),
                    )),
                };
            Some(SaslSettings {
                mechanism,
                username: s.username.clone(),
                password,
            })
        }
    };
    Ok(KafkaSecurity {
        section: section.to_string(),
        tls,
        sasl,
    })
}

pub(super) fn reject_managed_properties(
    properties: &BTreeMap<String, String>,
    at: usize,
    field: &str,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<(), LoadError> {
    match properties
        .keys()
        .find(|k| MANAGED_KAFKA_PROPERTIES.contains(&k.as_str()))
    {
        Some(k) => Err(invalid(
            at,
            field,
            format!("`{k}` is set by sluice and cannot be overridden"),
        )),
        None => Ok(()),
    }
}

pub(super) fn start_at(
    raw: &RawSource,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<StartAt, LoadError> {
    match raw.start.as_ref().map(|s| (s.get_ref().as_str(), s.span().start)) {
        None | Some(("earliest", _)) => Ok(StartAt::Earliest),
        Some(("latest", _)) => Ok(StartAt::Latest),
        Some((other, offset)) => Err(invalid(
            offset,
            "source.start",
            format!("`{other}`: expected `earliest` or `latest`"),
        )),
    }
}

/// A `[publish]` or `[raw_stream]` section: a Kafka topic or a Kinesis stream.
pub(super) fn publish_config(
    raw: &RawPublish,
    section: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<PublishConfig, LoadError> {
    if raw.kind.get_ref() == "kafka" {
        reject_managed_properties(
            &raw.properties,
            raw.kind.span().start,
            &format!("{section}.properties"),
            invalid,
        )?;
    }
    let at = raw.kind.span().start;
    let required = |value: &Option<String>, field: &str| {
        required(value, &format!("{section}.{field}"), section, &raw.kind, invalid)
    };
    Ok(match raw.kind.get_ref().as_str() {
        "kafka" => PublishConfig::Kafka {
            settings: KafkaSettings {
                brokers: required(&raw.brokers, "brokers")?,
                properties: raw.properties.clone(),
                security: kafka_security(section, raw.tls.as_ref(), raw.sasl.as_ref(), resolve, invalid)?,
            },
            topic: required(&raw.topic, "topic")?,
        },
        "kinesis" => PublishConfig::Kinesis {
            settings: KinesisSettings {
                region: raw.region.clone(),
                endpoint: raw.endpoint.clone(),
            },
            stream: required(&raw.stream, "stream")?,
        },
        other => {
            return Err(invalid(
                at,
                &format!("{section}.kind"),
                format!("unknown {section} kind `{other}`: expected `kafka` or `kinesis`"),
            ))
        }
    })
}
