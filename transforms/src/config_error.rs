//! Errors in configuration and policy files: they name the file, the line and the field.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.field,
            self.message
        )
    }
}

impl ConfigError {
    pub fn new(file: &Path, text: &str, offset: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: line_of(text, offset),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A TOML syntax or shape error. Only the parser's message is kept, not its excerpt of the
    /// file, so a misplaced secret is never echoed.
    pub fn from_toml(file: &Path, text: &str, err: &toml::de::Error) -> Self {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        let message = without_quoted_values(err.message().trim());
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .unwrap_or("(syntax)")
            .to_string();
        Self::new(file, text, offset, field, message)
    }
}

/// serde's type errors quote the value (`invalid type: string "…", expected a boolean`): a value
/// set from the environment may be a secret, so everything from the first quote to the last is
/// blanked (a value may itself hold quotes: pairing them up would print its tail).
fn without_quoted_values(message: &str) -> String {
    match (message.find('"'), message.rfind('"')) {
        (Some(first), Some(last)) if first < last => {
            format!("{}\"…\"{}", &message[..first], &message[last + 1..])
        }
        (Some(only), _) => format!("{}\"…", &message[..only]),
        _ => message.to_string(),
    }
}

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_errors_never_echo_a_value() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            flag: bool,
        }
        for text in [
            "flag = \"hunter2-secret\"\n",
            // A quote inside the value: its tail must not show either.
            "flag = 'hunter2\"-tail-secret'\n",
            "flag = 'a\"b\"c-tail-secret'\n",
        ] {
            let err = toml::from_str::<T>(text).unwrap_err();
            let e = ConfigError::from_toml(Path::new("c.toml"), text, &err);
            assert!(
                !e.to_string().contains("hunter2") && !e.to_string().contains("secret"),
                "{e}"
            );
            assert!(e.to_string().starts_with("c.toml:1:"), "{e}");
        }
    }
}
