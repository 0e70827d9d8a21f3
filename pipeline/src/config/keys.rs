//! `[keys]`: the key store and the master key.

use super::*;

/// Where the master key comes from: the environment variable wins when set.
#[derive(Debug, Clone)]
pub struct MasterKeySource {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

pub(super) fn key_store_config(
    raw: &RawKeys,
    text: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    invalid: &dyn Fn(usize, &str, String) -> LoadError,
) -> Result<KeyStoreLocation, LoadError> {
    let at = raw
        .kind
        .as_ref()
        .map(|k| k.span().start)
        .unwrap_or_else(|| text.find("[keys]").unwrap_or(0));
    let kind = raw.kind.as_ref().map(|k| k.get_ref().as_str()).unwrap_or("sqlite");
    let required = |v: &Option<String>, field: &str| {
        v.clone()
            .ok_or_else(|| invalid(at, field, format!("required for `kind = \"{kind}\"`")))
    };
    match kind {
        "sqlite" => Ok(KeyStoreLocation::Sqlite(resolve(&required(&raw.store, "keys.store")?))),
        "postgres" => Ok(KeyStoreLocation::Postgres(PgKeyStoreSettings {
            host: raw.host.clone().unwrap_or_else(|| defaults::PG_HOST.into()),
            port: raw.port.unwrap_or(defaults::PG_PORT),
            user: required(&raw.user, "keys.user")?,
            password_env: raw.password_env.clone(),
            database: required(&raw.database, "keys.database")?,
            schema: raw
                .schema
                .clone()
                .unwrap_or_else(|| defaults::PG_KEY_STORE_SCHEMA.into()),
        })),
        other => Err(invalid(
            at,
            "keys.kind",
            format!("unknown key store kind `{other}`: expected `sqlite` or `postgres`"),
        )),
    }
}
