//! What kind of failure an error is, whatever connector raised it: callers decide by kind
//! whether to retry, start a new pass or stop (and an operator reads it first in a log line).

/// The kinds of failure every connector error falls into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A setting is wrong or missing (fix the configuration or the environment).
    Config,
    /// The source cannot be read now (broker, stream, database or file unavailable).
    SourceUnavailable,
    /// A table, bucket or catalog cannot be written now.
    SinkUnavailable,
    /// Another writer's commit conflicted with this one: prepare again on the new version.
    Conflict,
    /// Another writer committed a stream this one holds: drop uncommitted work, read again.
    Fenced,
    /// The key store or a key: unavailable, or not the right master key.
    Keys,
    /// The data is not what it should be (a replaced file, a cut spool, an undecodable
    /// message): stop with its position, do not guess.
    Data,
    /// A defect or an unexpected state.
    Internal,
}

/// An error that knows its kind.
pub trait Kind {
    fn kind(&self) -> ErrorKind;
}

impl Kind for crate::lake::LakeError {
    fn kind(&self) -> ErrorKind {
        use crate::delta::DeltaSinkError as D;
        use crate::iceberg::IcebergSinkError as I;
        use crate::lake::LakeError as L;
        if self.is_fenced() {
            return ErrorKind::Fenced;
        }
        if self.is_conflict() {
            return ErrorKind::Conflict;
        }
        match self {
            L::Delta(D::Location { .. }) => ErrorKind::Config,
            L::Delta(D::SchemaChanged(_)) | L::Iceberg(I::SchemaChanged(_)) => ErrorKind::Config,
            L::Iceberg(I::UnsupportedType { .. }) => ErrorKind::Config,
            L::Query(_) => ErrorKind::Internal,
            _ => ErrorKind::SinkUnavailable,
        }
    }
}

impl Kind for crate::keystore::KeyStoreError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Keys
    }
}

impl Kind for crate::source::SourceError {
    fn kind(&self) -> ErrorKind {
        use crate::file::FileSourceError as F;
        use crate::kafka::KafkaSourceError as K;
        use crate::postgres::PgError as P;
        use crate::source::SourceError as S;
        match self {
            S::File(F::Io { .. }) => ErrorKind::SourceUnavailable,
            S::File(_) => ErrorKind::Data,
            S::Kafka(K::Security { .. } | K::Secret(_)) => ErrorKind::Config,
            S::Kafka(_) | S::Kinesis(_) => ErrorKind::SourceUnavailable,
            S::Postgres(
                P::WalLevel { .. }
                | P::NoReplicationPrivilege { .. }
                | P::NoTable { .. }
                | P::ReplicaIdentity { .. }
                | P::PublicationMismatch { .. }
                | P::PublicationOperations { .. }
                | P::SlotMismatch { .. },
            ) => ErrorKind::Config,
            S::Postgres(P::Decode { .. } | P::UnknownRelation { .. } | P::Protocol { .. }) => ErrorKind::Data,
            S::Postgres(_) => ErrorKind::SourceUnavailable,
            S::Lake(e) => e.kind(),
            S::Spool(_) => ErrorKind::Data,
            S::Secret(_) => ErrorKind::Config,
            S::Runtime(_) | S::Internal(_) => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::DeltaSinkError;
    use crate::lake::LakeError;

    #[test]
    fn a_fenced_commit_is_fenced_and_a_replaced_file_is_data() {
        let fenced = LakeError::Delta(DeltaSinkError::Fenced {
            table: "t".into(),
            stream: "s".into(),
            expected: Some(1),
        });
        assert_eq!(fenced.kind(), ErrorKind::Fenced);
        let replaced = crate::source::SourceError::File(crate::file::FileSourceError::Replaced {
            path: "f".into(),
            position: 3,
        });
        assert_eq!(replaced.kind(), ErrorKind::Data);
    }
}
