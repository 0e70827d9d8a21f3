//! The file source: Debezium events one per line in `.jsonl` files (optionally `.gz`), a file
//! or a directory of them. Also how a dumped topic is replayed. Reading is streaming: memory
//! does not grow with file size, and a line longer than the event limit is never held whole.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

pub use crate::source::LineEnd;

mod config;
mod source;
pub use config::FileSourceConfig;
pub(crate) use source::{FileSource, CHUNK_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("source {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("source {0}: no .jsonl or .jsonl.gz files found")]
    Empty(PathBuf),
    #[error("source {path} is shorter than its committed position {position}: it was truncated or replaced; move it aside or use a new pipeline name")]
    Shrunk { path: PathBuf, position: u64 },
    #[error("source {path} is not the file whose events up to byte {position} were committed (its first bytes differ): it was replaced; move it aside, or give it another name to read it as a new stream")]
    Replaced { path: PathBuf, position: u64 },
    #[error("source state {path}: {message}")]
    State { path: PathBuf, message: String },
}

/// One input file; `stream` is its name relative to the source root, stable across runs, and
/// is what positions are committed under.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    pub stream: String,
    pub path: PathBuf,
}

impl SourceFile {
    pub(crate) fn gzipped(&self) -> bool {
        self.path.extension().is_some_and(|e| e == "gz")
    }
}

/// Lists the event files of a path: the file itself, or a directory's `.jsonl`, `.json` and
/// `.gz` files in name order (recursively). Symbolic links inside the directory are skipped
/// unless `follow_symlinks`: a link to a directory of the source would list its files twice,
/// under two stream names, and ingest them twice. Followed, a file reached twice (or a link
/// loop) is listed once, by its first name in order.
pub(crate) fn list_files(root: &Path, follow_symlinks: bool) -> Result<Vec<SourceFile>, FileSourceError> {
    let io_err = |source| FileSourceError::Io {
        path: root.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(root).map_err(io_err)?;
    if meta.is_file() {
        let stream = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![SourceFile {
            stream,
            path: root.to_path_buf(),
        }]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut seen_dirs = std::collections::HashSet::new();
    while let Some(dir) = dirs.pop() {
        if follow_symlinks && !seen_dirs.insert(std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone())) {
            continue;
        }
        for entry in std::fs::read_dir(&dir).map_err(|source| FileSourceError::Io {
            path: dir.clone(),
            source,
        })? {
            let entry = entry.map_err(|source| FileSourceError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if is_link && !follow_symlinks {
                tracing::warn!(path = %path.display(), "symbolic link in the source directory skipped (source.follow_symlinks = false)");
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if is_event_file(&path) {
                let stream = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push(SourceFile { stream, path });
            }
        }
    }
    if files.is_empty() {
        return Err(FileSourceError::Empty(root.to_path_buf()));
    }
    files.sort_by(|a, b| a.stream.cmp(&b.stream));
    if follow_symlinks {
        let mut real = std::collections::HashSet::new();
        files.retain(|f| real.insert(std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone())));
    }
    Ok(files)
}

/// Bytes of a file's beginning its fingerprint hashes.
pub(crate) const FINGERPRINT_HEAD: u64 = 4096;

/// What identifies a source file behind its name: a hash of its first bytes (appending never
/// changes them; another file under the name has other ones) and its inode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Fingerprint {
    pub head_len: u64,
    pub head_sha256: String,
    pub inode: u64,
}

impl Fingerprint {
    /// The fingerprint of the file's first `head_len` bytes (fewer if it is shorter).
    pub(crate) fn of(path: &Path, head_len: u64) -> io::Result<Self> {
        let file = File::open(path)?;
        let inode = inode_of(&file.metadata()?);
        let mut head = Vec::with_capacity(head_len as usize);
        file.take(head_len).read_to_end(&mut head)?;
        Ok(Self {
            head_len: head.len() as u64,
            head_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &head)),
            inode,
        })
    }
}

#[cfg(unix)]
fn inode_of(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode_of(_: &std::fs::Metadata) -> u64 {
    0
}

/// Each stream's fingerprint, recorded when it was first read (a JSON file, replaced
/// atomically): a file that is not the one whose events were committed is an error naming it,
/// never read from the middle.
pub(crate) struct Fingerprints {
    path: PathBuf,
    known: std::collections::BTreeMap<String, Fingerprint>,
}

impl Fingerprints {
    pub(crate) fn load(path: PathBuf) -> Result<Self, FileSourceError> {
        let known = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| FileSourceError::State {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Default::default(),
            Err(source) => return Err(FileSourceError::Io { path, source }),
        };
        Ok(Self { path, known })
    }

    /// Checks every file whose stream has a committed position (`committed`, bytes) against
    /// its recorded fingerprint, and records new streams (and longer heads of growing ones).
    pub(crate) fn check(
        &mut self,
        files: &[SourceFile],
        committed: &std::collections::HashMap<String, u64>,
    ) -> Result<(), FileSourceError> {
        let mut changed = false;
        for file in files {
            let io_err = |source| FileSourceError::Io {
                path: file.path.clone(),
                source,
            };
            let position = committed.get(&file.stream).copied().unwrap_or(0);
            let now = match self.known.get(&file.stream) {
                Some(recorded) => {
                    let now = Fingerprint::of(&file.path, recorded.head_len).map_err(io_err)?;
                    if now.head_len == recorded.head_len && now.head_sha256 == recorded.head_sha256 {
                        // The same file; a head recorded while it was short grows with it.
                        if recorded.head_len < FINGERPRINT_HEAD || now.inode != recorded.inode {
                            Fingerprint::of(&file.path, FINGERPRINT_HEAD).map_err(io_err)?
                        } else {
                            continue;
                        }
                    } else if position > 0 {
                        return Err(FileSourceError::Replaced {
                            path: file.path.clone(),
                            position,
                        });
                    } else {
                        // Nothing of the old file was committed: this one is the stream now.
                        Fingerprint::of(&file.path, FINGERPRINT_HEAD).map_err(io_err)?
                    }
                }
                None => Fingerprint::of(&file.path, FINGERPRINT_HEAD).map_err(io_err)?,
            };
            if self.known.get(&file.stream) != Some(&now) {
                self.known.insert(file.stream.clone(), now);
                changed = true;
            }
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), FileSourceError> {
        let fail = |source| FileSourceError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let tmp = self.path.with_extension("partial");
        std::fs::write(&tmp, serde_json::to_vec(&self.known).expect("fingerprints serialize")).map_err(fail)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)
    }
}

fn is_event_file(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".jsonl.gz") || name.ends_with(".json.gz")
}

pub(crate) struct LineReader {
    reader: Box<dyn BufRead + Send>,
    offset: u64,
    max_line: usize,
}

impl LineReader {
    /// Opens `file` positioned at `start` (a line boundary from a committed position). Lines
    /// longer than `max_line` bytes are cut to that length (the caller quarantines them).
    pub(crate) fn open(file: &SourceFile, start: u64, max_line: usize) -> Result<Self, FileSourceError> {
        let io_err = |source| FileSourceError::Io {
            path: file.path.clone(),
            source,
        };
        let mut raw = File::open(&file.path).map_err(io_err)?;
        // A stream shorter than its committed position was truncated or replaced: reading on
        // would skip or garble events, so stop and say so.
        let shrunk = || FileSourceError::Shrunk {
            path: file.path.clone(),
            position: start,
        };
        let reader: Box<dyn BufRead + Send> = if file.gzipped() {
            let mut r = BufReader::with_capacity(1 << 20, MultiGzDecoder::new(BufReader::new(raw)));
            // Compressed streams cannot seek: decompress and discard up to the position.
            let skipped = io::copy(&mut (&mut r).take(start), &mut io::sink()).map_err(io_err)?;
            if skipped < start {
                return Err(shrunk());
            }
            Box::new(r)
        } else {
            if raw.metadata().map_err(io_err)?.len() < start {
                return Err(shrunk());
            }
            raw.seek(SeekFrom::Start(start)).map_err(io_err)?;
            Box::new(BufReader::with_capacity(1 << 20, raw))
        };
        Ok(Self {
            reader,
            offset: start,
            max_line,
        })
    }

    /// Reads the next line into `buf` (cleared first, newline removed). `None` at end of file.
    pub(crate) fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<LineEnd>> {
        buf.clear();
        let mut len = 0usize;
        let mut consumed = 0u64;
        let mut terminated = false;
        let mut last_byte = None;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                if consumed == 0 {
                    return Ok(None);
                }
                break;
            }
            let (chunk, done) = match memchr::memchr(b'\n', available) {
                Some(i) => (&available[..i], Some(i + 1)),
                None => (available, None),
            };
            if let Some(b) = chunk.last() {
                last_byte = Some(*b);
            }
            let room = self.max_line.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            len += chunk.len();
            let used = done.unwrap_or(available.len());
            self.reader.consume(used);
            consumed += used as u64;
            if done.is_some() {
                terminated = true;
                break;
            }
        }
        // A CRLF line ends in `\r`: not part of the event, buffered or not.
        if terminated && last_byte == Some(b'\r') {
            if len <= self.max_line {
                buf.pop();
            }
            len -= 1;
        }
        self.offset += consumed;
        Ok(Some(LineEnd {
            end_offset: self.offset,
            len,
            terminated,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_resume_at_offsets_in_plain_and_gzip_files() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"first\nsecond line\r\nthird-is-too-long\nlast-without-newline";
        std::fs::write(dir.path().join("a.jsonl"), body).unwrap();
        let mut gz = flate2::write::GzEncoder::new(
            File::create(dir.path().join("b.jsonl.gz")).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(body).unwrap();
        gz.finish().unwrap();
        std::fs::write(dir.path().join("ignored.txt"), b"x").unwrap();
        let files = list_files(dir.path(), false).unwrap();
        assert_eq!(
            files.iter().map(|f| f.stream.as_str()).collect::<Vec<_>>(),
            ["a.jsonl", "b.jsonl.gz"]
        );
        for f in &files {
            let mut r = LineReader::open(f, 0, 8).unwrap();
            let mut buf = Vec::new();
            let mut seen = Vec::new();
            while let Some(end) = r.next_line(&mut buf).unwrap() {
                seen.push((
                    String::from_utf8(buf.clone()).unwrap(),
                    end.end_offset,
                    end.truncated(8),
                ));
            }
            assert_eq!(
                seen,
                vec![
                    ("first".to_string(), 6, false),
                    ("second l".to_string(), 19, true),
                    ("third-is".to_string(), 37, true),
                    ("last-wit".to_string(), body.len() as u64, true)
                ]
            );
            let mut r = LineReader::open(f, 19, 100).unwrap();
            r.next_line(&mut buf).unwrap();
            assert_eq!(buf, b"third-is-too-long");
            assert!(matches!(
                LineReader::open(f, body.len() as u64 + 1, 8),
                Err(FileSourceError::Shrunk { .. })
            ));
        }
    }

    #[test]
    fn a_replaced_file_is_an_error_and_an_appended_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events");
        std::fs::create_dir(&events).unwrap();
        let path = events.join("a.jsonl");
        std::fs::write(&path, b"{\"n\":1}\n").unwrap();
        let state = dir.path().join("state.json");
        let list = || list_files(&events, false).unwrap();
        let committed = |n: u64| std::collections::HashMap::from([("a.jsonl".to_string(), n)]);
        Fingerprints::load(state.clone())
            .unwrap()
            .check(&list(), &committed(0))
            .unwrap();
        // Appended to: the same file, its longer head recorded.
        std::fs::write(&path, b"{\"n\":1}\n{\"n\":2}\n").unwrap();
        Fingerprints::load(state.clone())
            .unwrap()
            .check(&list(), &committed(8))
            .unwrap();
        // Replaced by another file at least as long: refused, by name.
        std::fs::write(&path, b"{\"n\":7}\n{\"n\":8}\n{\"n\":9}\n").unwrap();
        let e = Fingerprints::load(state.clone())
            .unwrap()
            .check(&list(), &committed(16))
            .unwrap_err();
        assert!(matches!(e, FileSourceError::Replaced { position: 16, .. }), "{e}");
        assert!(e.to_string().contains("a.jsonl"), "{e}");
        // With nothing committed of it, the new file is simply the stream.
        Fingerprints::load(state.clone())
            .unwrap()
            .check(&list(), &committed(0))
            .unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn symbolic_links_in_the_source_are_skipped_unless_followed_and_never_list_a_file_twice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("2024")).unwrap();
        std::fs::write(dir.path().join("2024/a.jsonl"), b"{}\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("2024"), dir.path().join("latest")).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("2024/loop")).unwrap();
        let streams = |follow| {
            list_files(dir.path(), follow)
                .unwrap()
                .into_iter()
                .map(|f| f.stream)
                .collect::<Vec<_>>()
        };
        assert_eq!(streams(false), ["2024/a.jsonl"]);
        assert_eq!(streams(true), ["2024/a.jsonl"]);
    }

    #[test]
    fn a_crlf_line_of_exactly_the_limit_is_not_oversized() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.jsonl"), b"12345\r\n123456\r\n").unwrap();
        let file = &list_files(dir.path(), false).unwrap()[0];
        let mut r = LineReader::open(file, 0, 5).unwrap();
        let mut buf = Vec::new();
        let end = r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!((buf.as_slice(), end.len, end.truncated(5)), (&b"12345"[..], 5, false));
        let end = r.next_line(&mut buf).unwrap().unwrap();
        assert_eq!((end.len, end.truncated(5)), (6, true));
    }
}
