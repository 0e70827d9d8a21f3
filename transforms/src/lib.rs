//! The sanitizing engine: policies in, Arrow batches in, Arrow batches out.
//!
//! Nothing here performs I/O. Keys arrive through [`keys::KeyProvider`], implemented by the
//! key store in `connectors/`; time arrives as arguments.

pub mod actions;
pub mod config_error;
#[cfg(any(test, feature = "test-support"))]
pub mod counting_alloc;
pub mod crypto;
pub mod engine;
pub mod functions;
pub mod keys;
pub mod policy;
pub mod raw;
pub mod sensitive;
pub mod vault;

pub use config_error::ConfigError;
pub use engine::{RowReject, TableTransform, Transformed};
pub use policy::{Erasure, Policy};
pub use raw::{Op, RawBatch, RawBatchBuilder};
pub use sensitive::Sensitive;
