//! Credentials (passwords, tokens, private-key passphrases): read from an environment variable
//! or a file named in the configuration, never from the configuration text, and never printed.

use std::fmt;
use std::path::Path;

/// A credential. `Debug` and `Display` print `<redacted>`; `expose` is the one way to it.
#[derive(Clone)]
pub struct Secret(String);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} (named by {1}) is not set")]
    Unset(String, &'static str),
    #[error("{path} (named by {setting}): {source}")]
    File {
        path: String,
        setting: &'static str,
        source: std::io::Error,
    },
}

impl Secret {
    /// The value of environment variable `var`; `setting` names the config key that named it.
    pub fn from_env(var: &str, setting: &'static str) -> Result<Self, SecretError> {
        std::env::var(var)
            .map(Secret)
            .map_err(|_| SecretError::Unset(var.to_string(), setting))
    }

    /// A password that may be absent: from the variable the configuration `named`, which must
    /// then be set (an unset one is a mistake, not an empty password); else from `fallback`
    /// if it is set (as libpq reads `PGPASSWORD`), else none.
    pub fn from_named_env_or(
        named: Option<&str>,
        fallback: &str,
        setting: &'static str,
    ) -> Result<Option<Self>, SecretError> {
        match named {
            Some(var) => Self::from_env(var, setting).map(Some),
            None => Ok(Self::from_env(fallback, setting).ok()),
        }
    }

    /// The contents of `path`, without a trailing newline.
    pub(crate) fn from_file(path: &Path, setting: &'static str) -> Result<Self, SecretError> {
        std::fs::read_to_string(path)
            .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|source| SecretError::File {
                path: path.display().to_string(),
                setting,
                source,
            })
    }

    /// The credential itself: for the client that sends it, never for a message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_and_unset_variables_are_named() {
        std::env::set_var("SLUICE_TEST_SECRET_VALUE", "hunter2-abc");
        let s = Secret::from_env("SLUICE_TEST_SECRET_VALUE", "source.sasl.password_env").unwrap();
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2-abc");
        let e = Secret::from_env("SLUICE_TEST_SECRET_UNSET", "source.sasl.password_env").unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable SLUICE_TEST_SECRET_UNSET (named by source.sasl.password_env) is not set"
        );
    }
    #[test]
    fn a_named_password_variable_must_be_set_and_the_fallback_may_be_absent() {
        std::env::set_var("SLUICE_TEST_PG_PW_SET", "pg-pw");
        let named = |var| Secret::from_named_env_or(Some(var), "SLUICE_TEST_PG_PW_FALLBACK_UNSET", "keys.password_env");
        assert_eq!(named("SLUICE_TEST_PG_PW_SET").unwrap().unwrap().expose(), "pg-pw");
        assert_eq!(
            named("SLUICE_TEST_PG_PW_UNSET").unwrap_err().to_string(),
            "environment variable SLUICE_TEST_PG_PW_UNSET (named by keys.password_env) is not set"
        );
        let fallback = |var| Secret::from_named_env_or(None, var, "keys.password_env").unwrap();
        assert_eq!(fallback("SLUICE_TEST_PG_PW_SET").unwrap().expose(), "pg-pw");
        assert!(fallback("SLUICE_TEST_PG_PW_FALLBACK_UNSET").is_none());
    }
}
