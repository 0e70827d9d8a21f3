//! Debezium events in Avro (Confluent's `AvroConverter`): the wire format (magic byte 0, a
//! 4-byte big-endian schema id, the Avro binary datum), writer schemas fetched by id from a
//! Confluent-compatible Schema Registry and cached (an id never changes meaning), and each
//! message turned into the JSON converter's form — `{"schema": <Connect schema>, "payload": …}`
//! with values in Connect's encodings — so one decoder ([`crate::debezium`]) reads both.
//!
//! Debezium marks its semantic types with `connect.name` on the field's type
//! (`io.debezium.time.MicroTimestamp` on a `long`), Avro logical types (`decimal`, `date`,
//! `timestamp-micros`…) where the converter writes them; both are read from the registry's schema
//! text, since `apache-avro` drops attributes on primitive types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use base64::Engine;
use serde_json::{json, Value as Json};

use crate::secret::{Secret, SecretError};

/// How the registry is reached.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub url: String,
    pub auth: RegistryAuth,
    /// PEM file of the CA that signs the registry's certificate (else the system roots).
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub enum RegistryAuth {
    None,
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry {url}: schema id {id}: {reason}")]
    Fetch { url: String, id: u32, reason: String },
    #[error("schema registry {url}: {reason}")]
    Setup { url: String, reason: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Why one message cannot be read. Static text: never any part of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AvroReject {
    /// Not the Confluent wire format (no magic byte 0 and schema id).
    NotFramed,
    /// The registry has no schema of this id.
    UnknownSchema,
    /// The datum does not decode with its writer schema.
    Malformed,
}

impl AvroReject {
    pub fn reason(self) -> &'static str {
        match self {
            AvroReject::NotFramed => "malformed_avro",
            AvroReject::UnknownSchema => "unknown_schema",
            AvroReject::Malformed => "malformed_avro",
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            AvroReject::NotFramed => "not Confluent-framed Avro (magic byte 0, then a 4-byte schema id)",
            AvroReject::UnknownSchema => "the schema registry has no schema of the message's id",
            AvroReject::Malformed => "the Avro datum does not decode with its writer schema",
        }
    }
}

/// A writer schema and what the JSON decoder needs to know of it.
pub struct WriterSchema {
    avro: Schema,
    /// The Connect schema (JSON text) of the envelope's row image, for [`crate::debezium`].
    connect: Box<serde_json::value::RawValue>,
}

/// Caps what a length prefix in a hostile datum can make the decoder allocate.
const MAX_AVRO_ALLOCATION: usize = 64 << 20;

/// A Confluent-compatible Schema Registry client with a cache of writer schemas by id.
pub struct SchemaRegistry {
    settings: RegistrySettings,
    client: reqwest::Client,
    runtime: Mutex<tokio::runtime::Runtime>,
    cache: RwLock<HashMap<u32, Option<Arc<WriterSchema>>>>,
}

impl SchemaRegistry {
    pub fn new(settings: RegistrySettings) -> Result<Self, RegistryError> {
        let setup = |reason: String| RegistryError::Setup {
            url: settings.url.clone(),
            reason,
        };
        let _ = apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| setup(format!("ca_file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|_| setup(format!("ca_file {}: not a PEM certificate", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(|e| setup(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| setup(e.to_string()))?;
        Ok(Self {
            settings,
            client,
            runtime: Mutex::new(runtime),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Puts a writer schema in the cache as if fetched (a registry export read offline; tests
    /// and benchmarks).
    pub fn preload(&self, id: u32, schema: &str) -> Result<(), String> {
        let schema = writer_schema(schema)?;
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Some(Arc::new(schema)));
        Ok(())
    }

    /// The writer schema of `id` (`None`: the registry has none of that id).
    pub fn schema(&self, id: u32) -> Result<Option<Arc<WriterSchema>>, RegistryError> {
        if let Some(found) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(found.clone());
        }
        let fetched = self.fetch(id)?.map(Arc::new);
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        // Ids a hostile input names without end must not grow the cache without end.
        if fetched.is_none() && cache.len() > 10_000 {
            return Ok(None);
        }
        Ok(cache.entry(id).or_insert(fetched).clone())
    }

    fn fetch(&self, id: u32) -> Result<Option<WriterSchema>, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.settings.url.trim_end_matches('/'));
        let fail = |reason: String| RegistryError::Fetch {
            url: self.settings.url.clone(),
            id,
            reason,
        };
        let mut request = self
            .client
            .get(&url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        request = match &self.settings.auth {
            RegistryAuth::None => request,
            RegistryAuth::Basic { username, password } => request.basic_auth(username, Some(password.expose())),
            RegistryAuth::Bearer(token) => request.bearer_auth(token.expose()),
        };
        let runtime = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        let (status, body) = runtime
            .block_on(async {
                let response = request.send().await?;
                let status = response.status();
                Ok::<_, reqwest::Error>((status, response.bytes().await?))
            })
            // reqwest's errors name the URL and the cause, never a header.
            .map_err(|e| fail(e.without_url().to_string()))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        #[derive(serde::Deserialize)]
        struct Registered {
            schema: String,
            #[serde(default, rename = "schemaType")]
            schema_type: Option<String>,
        }
        let registered: Registered =
            serde_json::from_slice(&body).map_err(|_| fail("the response is not a registered schema".into()))?;
        if registered.schema_type.as_deref().is_some_and(|t| t != "AVRO") {
            return Err(fail("not an Avro schema".into()));
        }
        writer_schema(&registered.schema).map(Some).map_err(fail)
    }
}

/// Parses a writer schema and derives the Connect schema of its row image.
fn writer_schema(text: &str) -> Result<WriterSchema, String> {
    let avro = Schema::parse_str(text).map_err(|e| format!("not a valid Avro schema: {e}"))?;
    let raw: Json = serde_json::from_str(text).map_err(|_| "not JSON".to_string())?;
    let connect = serde_json::value::to_raw_value(&connect_envelope(&raw)).map_err(|e| e.to_string())?;
    Ok(WriterSchema { avro, connect })
}

/// The Connect schema the JSON converter would send for an envelope record: just what the
/// decoder reads (each image column's semantic name and scale).
fn connect_envelope(envelope: &Json) -> Json {
    let mut records: HashMap<String, &Json> = HashMap::new();
    collect_records(envelope, &mut records);
    let image = ["before", "after"].iter().find_map(|name| {
        let field = envelope["fields"].as_array()?.iter().find(|f| f["name"] == *name)?;
        record_of(&field["type"], &records)
    });
    let fields: Vec<Json> = image
        .and_then(|record| record["fields"].as_array())
        .map(|fields| {
            fields
                .iter()
                .map(|f| {
                    let mut out = json!({"field": f["name"]});
                    if let Some((name, scale)) = semantic(&f["type"]) {
                        out["name"] = json!(name);
                        if let Some(scale) = scale {
                            out["parameters"] = json!({"scale": scale.to_string()});
                        }
                    }
                    out
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"type": "struct", "fields": [
        {"type": "struct", "field": "before", "fields": fields},
        {"type": "struct", "field": "after", "fields": fields},
    ]})
}

/// Named records of a schema, for `after: ["null", "Value"]` (a reference to `before`'s type).
fn collect_records<'a>(schema: &'a Json, out: &mut HashMap<String, &'a Json>) {
    match schema {
        Json::Object(o) => {
            if o.get("type").and_then(Json::as_str) == Some("record") {
                if let Some(name) = o.get("name").and_then(Json::as_str) {
                    out.insert(name.to_string(), schema);
                    if let Some(ns) = o.get("namespace").and_then(Json::as_str) {
                        out.insert(format!("{ns}.{name}"), schema);
                    }
                }
            }
            o.values().for_each(|v| collect_records(v, out));
        }
        Json::Array(a) => a.iter().for_each(|v| collect_records(v, out)),
        _ => {}
    }
}

fn record_of<'a>(ty: &'a Json, records: &HashMap<String, &'a Json>) -> Option<&'a Json> {
    match ty {
        Json::String(name) => records.get(name).copied(),
        Json::Array(branches) => branches.iter().find_map(|b| record_of(b, records)),
        Json::Object(o) if o.get("type").and_then(Json::as_str) == Some("record") => Some(ty),
        _ => None,
    }
}

/// The Connect semantic name (and decimal scale) of a field type: `connect.name` first, then
/// the Avro logical type.
fn semantic(ty: &Json) -> Option<(String, Option<u64>)> {
    let ty = match ty {
        Json::Array(branches) => branches.iter().find(|b| *b != "null")?,
        other => other,
    };
    let o = ty.as_object()?;
    let scale = o
        .get("scale")
        .and_then(Json::as_u64)
        .or_else(|| o.get("connect.parameters")?.get("scale")?.as_str()?.parse().ok());
    if let Some(name) = o.get("connect.name").and_then(Json::as_str) {
        return Some((name.to_string(), scale));
    }
    let name = match o.get("logicalType").and_then(Json::as_str)? {
        "decimal" => "org.apache.kafka.connect.data.Decimal",
        "date" => "org.apache.kafka.connect.data.Date",
        "time-millis" => "org.apache.kafka.connect.data.Time",
        "time-micros" => "io.debezium.time.MicroTime",
        "timestamp-millis" | "local-timestamp-millis" => "org.apache.kafka.connect.data.Timestamp",
        "timestamp-micros" | "local-timestamp-micros" => "io.debezium.time.MicroTimestamp",
        "timestamp-nanos" | "local-timestamp-nanos" => "io.debezium.time.NanoTimestamp",
        _ => return None,
    };
    Some((name.to_string(), scale))
}

/// One Confluent-framed Avro message as a JSON-converter event (`schema` + `payload`), written
/// into `out`; the inner error says why the message cannot be read, the outer one that the
/// registry could not be asked (the run stops: the message may well be fine).
pub fn transcode(
    message: &[u8],
    registry: &SchemaRegistry,
    out: &mut Vec<u8>,
) -> Result<Result<(), AvroReject>, RegistryError> {
    let [0, a, b, c, d, datum @ ..] = message else {
        return Ok(Err(AvroReject::NotFramed));
    };
    let Some(schema) = registry.schema(u32::from_be_bytes([*a, *b, *c, *d]))? else {
        return Ok(Err(AvroReject::UnknownSchema));
    };
    let mut reader = datum;
    let Ok(value) = apache_avro::from_avro_datum(&schema.avro, &mut reader, None) else {
        return Ok(Err(AvroReject::Malformed));
    };
    out.clear();
    out.extend_from_slice(b"{\"schema\":");
    out.extend_from_slice(schema.connect.get().as_bytes());
    out.extend_from_slice(b",\"payload\":");
    write_json(&value, out);
    out.push(b'}');
    Ok(Ok(()))
}

/// An Avro value as JSON in the JSON converter's encoding (see [`to_json`]), written straight
/// into `out`: no intermediate tree per message.
fn write_json(value: &Avro, out: &mut Vec<u8>) {
    use std::io::Write;
    let b64 = |bytes: &[u8], out: &mut Vec<u8>| {
        out.push(b'"');
        out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(bytes).as_bytes());
        out.push(b'"');
    };
    let string = |s: &str, out: &mut Vec<u8>| {
        let _ = serde_json::to_writer(&mut *out, s);
    };
    match value {
        Avro::Null | Avro::Duration(_) => out.extend_from_slice(b"null"),
        Avro::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => {
            let _ = write!(out, "{n}");
        }
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => {
            let _ = write!(out, "{n}");
        }
        Avro::Float(x) => {
            let _ = serde_json::to_writer(&mut *out, &float(f64::from(*x)));
        }
        Avro::Double(x) => {
            let _ = serde_json::to_writer(&mut *out, &float(*x));
        }
        Avro::Bytes(bytes) | Avro::Fixed(_, bytes) => b64(bytes, out),
        Avro::String(s) | Avro::Enum(_, s) => string(s, out),
        Avro::Uuid(u) => string(&u.to_string(), out),
        Avro::Decimal(d) => match <Vec<u8>>::try_from(d) {
            Ok(bytes) => b64(&bytes, out),
            Err(_) => out.extend_from_slice(b"null"),
        },
        Avro::BigDecimal(d) => string(&d.to_string(), out),
        Avro::Union(_, inner) => write_json(inner, out),
        Avro::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item, out);
            }
            out.push(b']');
        }
        Avro::Map(entries) => write_object(entries.iter().map(|(k, v)| (k.as_str(), v)), out),
        Avro::Record(fields) => write_object(fields.iter().map(|(k, v)| (k.as_str(), v)), out),
    }
}

fn write_object<'v>(entries: impl Iterator<Item = (&'v str, &'v Avro)>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, key);
        out.push(b':');
        write_json(value, out);
    }
    out.push(b'}');
}

fn float(x: f64) -> Json {
    serde_json::Number::from_f64(x)
        .map(Json::Number)
        .unwrap_or_else(|| Json::String(x.to_string()))
}

/// Resolves the configured credentials (read here, once).
pub fn registry_auth(
    username_env: Option<&str>,
    password_env: Option<&str>,
    token_env: Option<&str>,
) -> Result<RegistryAuth, SecretError> {
    Ok(match (username_env, password_env, token_env) {
        (_, _, Some(token)) => RegistryAuth::Bearer(Secret::from_env(token, "source.schema_registry.token_env")?),
        (Some(user), Some(password), None) => RegistryAuth::Basic {
            username: Secret::from_env(user, "source.schema_registry.username_env")?
                .expose()
                .to_string(),
            password: Secret::from_env(password, "source.schema_registry.password_env")?,
        },
        _ => RegistryAuth::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debezium envelope as the AvroConverter registers it (abridged from Debezium's
    /// PostgreSQL connector: `connect.name` on primitive types, `decimal` logical type).
    const ENVELOPE: &str = r#"{"type":"record","name":"Envelope","namespace":"dbserver1.inventory.orders","fields":[
        {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
            {"name":"id","type":"int"},
            {"name":"price","type":{"type":"bytes","scale":2,"precision":10,"connect.version":1,"connect.parameters":{"scale":"2","connect.decimal.precision":"10"},"connect.name":"org.apache.kafka.connect.data.Decimal","logicalType":"decimal"}},
            {"name":"order_date","type":["null",{"type":"int","connect.version":1,"connect.name":"io.debezium.time.Date"}],"default":null},
            {"name":"placed_at","type":{"type":"long","connect.version":1,"connect.name":"io.debezium.time.MicroTimestamp"}},
            {"name":"note","type":["null","string"],"default":null}],
            "connect.name":"dbserver1.inventory.orders.Value"}],"default":null},
        {"name":"after","type":["null","Value"],"default":null},
        {"name":"source","type":{"type":"record","name":"Source","namespace":"io.debezium.connector.postgresql","fields":[
            {"name":"db","type":"string"},{"name":"schema","type":"string"},{"name":"table","type":"string"},{"name":"ts_ms","type":"long"}]}},
        {"name":"op","type":"string"},
        {"name":"ts_ms","type":["null","long"],"default":null}],
        "connect.name":"dbserver1.inventory.orders.Envelope"}"#;

    #[test]
    fn debezium_semantics_come_from_connect_names_and_logical_types() {
        let w = writer_schema(ENVELOPE).unwrap();
        let image = crate::debezium::schema::ImageSchema::from_connect_envelope(w.connect.get()).unwrap();
        use crate::debezium::schema::{TimeUnit, ValueKind};
        assert_eq!(image.kind("price"), ValueKind::Decimal { scale: Some(2) });
        assert_eq!(image.kind("order_date"), ValueKind::Date);
        assert_eq!(image.kind("placed_at"), ValueKind::Timestamp(TimeUnit::Micros));
        assert_eq!(image.kind("note"), ValueKind::Plain);

        // A datum written by hand with the Avro encoding: the decoder reads it back as the JSON
        // converter's event, which the Debezium decoder then takes like any other.
        let record = Avro::Record(vec![
            ("before".into(), Avro::Union(0, Box::new(Avro::Null))),
            (
                "after".into(),
                Avro::Union(
                    1,
                    Box::new(Avro::Record(vec![
                        ("id".into(), Avro::Int(7)),
                        (
                            "price".into(),
                            Avro::Decimal(apache_avro::Decimal::from(vec![0x30, 0x39])),
                        ),
                        ("order_date".into(), Avro::Union(1, Box::new(Avro::Int(19905)))),
                        ("placed_at".into(), Avro::Long(1_719_835_200_123_456)),
                        ("note".into(), Avro::Union(0, Box::new(Avro::Null))),
                    ])),
                ),
            ),
            (
                "source".into(),
                Avro::Record(vec![
                    ("db".into(), Avro::String("inventory".into())),
                    ("schema".into(), Avro::String("public".into())),
                    ("table".into(), Avro::String("orders".into())),
                    ("ts_ms".into(), Avro::Long(1_719_835_200_000)),
                ]),
            ),
            ("op".into(), Avro::String("c".into())),
            ("ts_ms".into(), Avro::Union(0, Box::new(Avro::Null))),
        ]);
        let datum = apache_avro::to_avro_datum(&w.avro, record).unwrap();
        let decoded = apache_avro::from_avro_datum(&w.avro, &mut &datum[..], None).unwrap();
        let mut written = Vec::new();
        write_json(&decoded, &mut written);
        let json: Json = serde_json::from_slice(&written).unwrap();
        assert_eq!(json["before"], Json::Null);
        assert_eq!(json["after"]["note"], Json::Null);
        assert_eq!(json["after"]["price"], "MDk=");
        assert_eq!(json["after"]["order_date"], 19905);
        assert_eq!(json["after"]["placed_at"], 1_719_835_200_123_456i64);
        assert_eq!(json["source"]["table"], "orders");
    }
}
