//! Policy actions. Each lives in a file of its own; adding one touches that file and [`Action`].

pub mod drop;
pub mod encrypt;
pub mod generalize;
pub mod keep;
pub mod tokenize;
pub mod vault;

use arrow_schema::{DataType, TimeUnit};

pub use keep::KeepType;

use crate::functions::Function;

/// What happens to one source column.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Copied as a typed column.
    Keep(KeepType),
    /// Read (for `derive`) and then discarded.
    Drop,
    /// Replaced by a keyed HMAC token, deterministic within `domain`.
    Tokenize { domain: String },
    /// Replaced by an AES-256-GCM envelope under the subject's key.
    Encrypt,
    /// Encrypted into the PII vault; the analytic row keeps only what `derive` makes of it.
    Vault,
    /// Replaced by a coarser value.
    Generalize(Function),
}

impl Action {
    pub const NAMES: &'static [&'static str] = &["keep", "drop", "tokenize", "encrypt", "vault", "generalize"];

    pub fn name(&self) -> &'static str {
        match self {
            Action::Keep(_) => "keep",
            Action::Drop => "drop",
            Action::Tokenize { .. } => "tokenize",
            Action::Encrypt => "encrypt",
            Action::Vault => "vault",
            Action::Generalize(_) => "generalize",
        }
    }

    /// Whether the analytic column shows the raw value or a part of it (`keep`, `generalize`):
    /// never allowed for a subject id, which only ever leaves as a token or ciphertext.
    pub fn shows_value(&self) -> bool {
        matches!(self, Action::Keep(_) | Action::Generalize(_))
    }

    /// Name of the analytic column this action writes, if it writes one.
    pub fn output_name(&self, column: &str, rename: Option<&str>) -> Option<String> {
        let default = match self {
            Action::Drop | Action::Vault => return None,
            Action::Keep(_) => column.to_string(),
            Action::Tokenize { .. } => format!("{column}_token"),
            Action::Encrypt => format!("{column}_enc"),
            Action::Generalize(f) => format!("{column}_{}", f.name()),
        };
        Some(rename.map(str::to_string).unwrap_or(default))
    }

    pub fn output_type(&self) -> Option<DataType> {
        match self {
            Action::Drop | Action::Vault => None,
            Action::Keep(t) => Some(t.data_type()),
            Action::Tokenize { .. } => Some(DataType::Utf8),
            Action::Encrypt => Some(DataType::Binary),
            Action::Generalize(f) => Some(f.output_type()),
        }
    }

    /// One line for the release manifest.
    pub fn describe(&self) -> String {
        match self {
            Action::Keep(t) => format!("keep as {}", t.name()),
            Action::Drop => "drop".into(),
            Action::Tokenize { domain } => format!("tokenize (HMAC-SHA256, domain {domain})"),
            Action::Encrypt => "encrypt (AES-256-GCM, subject key)".into(),
            Action::Vault => "vault (ciphertext to the PII vault only)".into(),
            Action::Generalize(f) => format!("generalize {}", f.name()),
        }
    }
}

/// Arrow type of all timestamps written: what Delta and Iceberg both expect.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}
