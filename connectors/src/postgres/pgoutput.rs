//! The `pgoutput` logical decoding messages (protocol version 1) that `pgwire-replication`
//! leaves undecoded: relations, row changes, truncates. Begin, Commit and logical messages are
//! decoded by that crate. Tuple values stay borrowed text (we never ask for binary values).
//!
//! Errors carry message and field names only, never a value.

/// A tuple column as pgoutput sends it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Datum<'a> {
    Null,
    /// An unchanged TOASTed value the server did not send (`u`).
    UnchangedToast,
    Text(&'a [u8]),
}

/// Lengths only: a value must never reach a log line or a panic message.
impl std::fmt::Debug for Datum<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Datum::Null => f.write_str("Null"),
            Datum::UnchangedToast => f.write_str("UnchangedToast"),
            Datum::Text(t) => write!(f, "Text({} bytes)", t.len()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    pub name: String,
    pub type_oid: u32,
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Datum<'a>>,
    },
    Update {
        relation: u32,
        /// The old row: the key columns (`K`) or, under REPLICA IDENTITY FULL, all (`O`).
        old: Option<Vec<Datum<'a>>>,
        new: Vec<Datum<'a>>,
    },
    Delete {
        relation: u32,
        old: Vec<Datum<'a>>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, origin and anything newer: nothing to do.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput {message}: {problem}")]
pub struct DecodeError {
    pub message: &'static str,
    pub problem: &'static str,
}

struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn fail(&self, problem: &'static str) -> DecodeError {
        DecodeError {
            message: self.message,
            problem,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.fail("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.fail("unterminated name"))?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| self.fail("name is not UTF-8"))?;
        self.buf = &self.buf[end + 1..];
        Ok(s.to_string())
    }
    fn tuple(&mut self) -> Result<Vec<Datum<'a>>, DecodeError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    Datum::Text(self.take(len)?)
                }
                _ => return Err(self.fail("unknown tuple column kind (binary values are not requested)")),
            });
        }
        Ok(out)
    }
}

/// Decodes one message (the XLogData payload).
pub(crate) fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let Some((&tag, rest)) = data.split_first() else {
        return Err(DecodeError {
            message: "message",
            problem: "empty",
        });
    };
    let name = match tag {
        b'R' => "Relation",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        _ => return Ok(Message::Other),
    };
    let mut r = Reader {
        buf: rest,
        message: name,
    };
    Ok(match tag {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column {
                    name,
                    type_oid,
                    is_key: flags & 1 == 1,
                });
            }
            // pg_catalog relations are shown without the schema.
            let namespace = if namespace.is_empty() {
                "pg_catalog".to_string()
            } else {
                namespace
            };
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.fail("expected a new tuple"));
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let old = if kind == b'K' || kind == b'O' {
                let old = r.tuple()?;
                kind = r.u8()?;
                Some(old)
            } else {
                None
            };
            if kind != b'N' {
                return Err(r.fail("expected a new tuple"));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(r.fail("expected an old tuple"));
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        _ => unreachable!("tags filtered above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16385u32.to_be_bytes());
        b.extend(b"public\0accounts\0");
        b.push(b'f');
        b.extend(2i16.to_be_bytes());
        b.push(1);
        b.extend(b"id\0");
        b.extend(20u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"bio\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    #[test]
    fn relation_and_update_with_unchanged_toast_decode() {
        let rel = relation_bytes();
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str(), r.replica_identity),
            ("public", "accounts", b'f')
        );
        assert!(r.columns[0].is_key);
        assert_eq!(r.columns[1].type_oid, 25);

        let mut u = vec![b'U'];
        u.extend(16385u32.to_be_bytes());
        u.push(b'O');
        u.extend(2i16.to_be_bytes());
        u.extend([b't', 0, 0, 0, 1, b'7']);
        u.extend([b't', 0, 0, 0, 2, b'h', b'i']);
        u.push(b'N');
        u.extend(2i16.to_be_bytes());
        u.extend([b't', 0, 0, 0, 1, b'7']);
        u.push(b'u');
        let m = decode(&u).unwrap();
        assert_eq!(
            m,
            Message::Update {
                relation: 16385,
                old: Some(vec![Datum::Text(b"7"), Datum::Text(b"hi")]),
                new: vec![Datum::Text(b"7"), Datum::UnchangedToast],
            }
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let rel = relation_bytes();
        for cut in 1..rel.len() {
            assert!(decode(&rel[..cut]).is_err(), "cut at {cut}");
        }
        let t = [b'T', 0, 0, 0, 2, 0, 0, 0, 0, 1];
        assert!(decode(&t).is_err());
        let mut t = vec![b'T'];
        t.extend(1u32.to_be_bytes());
        t.push(0);
        t.extend(16385u32.to_be_bytes());
        assert_eq!(decode(&t).unwrap(), Message::Truncate { relations: vec![16385] });
    }
}
