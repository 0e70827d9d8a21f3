//! Files of Debezium events: each file is a stream, the offset a byte offset after a line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::file::{list_files, FileSourceError, Fingerprints, LineReader, SourceFile};

use crate::source::Chunk;
use crate::source::SourceError;
use crate::source::{ChunkSender, ReaderEnd, Source};

pub(crate) struct FileSource {
    root: PathBuf,
    files: Vec<SourceFile>,
    max_line: usize,
    chunk_events: usize,
    once: bool,
    poll: Duration,
    follow_symlinks: bool,
    /// Where the streams' fingerprints are recorded; `None`: not checked (tests).
    fingerprints: Option<std::path::PathBuf>,
}

/// Bytes of line data per chunk at most, so a chunk of huge events stays bounded too.
pub(crate) const CHUNK_BYTES: usize = 8 << 20;

impl FileSource {
    pub(crate) fn new(root: PathBuf, max_line: usize, chunk_events: usize, once: bool, poll: Duration) -> Self {
        Self {
            root,
            files: Vec::new(),
            max_line,
            chunk_events,
            once,
            poll,
            follow_symlinks: false,
            fingerprints: None,
        }
    }

    /// Symbolic links followed or not, and the file recording each stream's fingerprint.
    pub(crate) fn with_files(mut self, follow_symlinks: bool, fingerprints: std::path::PathBuf) -> Self {
        self.follow_symlinks = follow_symlinks;
        self.fingerprints = Some(fingerprints);
        self
    }

    /// Sends the file's lines from `start` in chunks; returns where it stopped, or `None` when
    /// the receiving side is gone.
    fn read_file(&self, file: &SourceFile, start: u64, out: &mut ChunkSender) -> Result<Option<u64>, SourceError> {
        let mut reader = LineReader::open(file, start, self.max_line)?;
        let stream: Arc<str> = Arc::from(file.stream.as_str());
        let mut line = Vec::new();
        let mut offset = start;
        let new_chunk = || Chunk::new(stream.clone(), self.chunk_events);
        let mut chunk = new_chunk();
        loop {
            let next = reader.next_line(&mut line).map_err(|source| FileSourceError::Io {
                path: file.path.clone(),
                source,
            })?;
            // In daemon mode a last line without its newline may still be being written:
            // leave it for the next pass.
            // A compressed file is never appended to: its last line is complete.
            let next = next.filter(|end| end.terminated || self.once || file.gzipped());
            if let Some(end) = next {
                chunk.push(&line, end);
                offset = end.end_offset;
            }
            let full = chunk.lines.len() >= self.chunk_events || chunk.data.len() >= CHUNK_BYTES;
            if (full || next.is_none())
                && !chunk.lines.is_empty()
                && !out.send(std::mem::replace(&mut chunk, new_chunk()))
            {
                return Ok(None);
            }
            if next.is_none() {
                return Ok(Some(offset));
            }
        }
    }
}

impl Source for FileSource {
    fn begin_pass(&mut self) -> Result<Vec<String>, SourceError> {
        self.files = list_files(&self.root, self.follow_symlinks)?;
        Ok(self.files.iter().map(|f| f.stream.clone()).collect())
    }

    fn read(&mut self, start: &HashMap<String, u64>, out: &mut ChunkSender) -> Result<ReaderEnd, SourceError> {
        // Before anything is read: a file that is not the one its committed position is in.
        if let Some(path) = &self.fingerprints {
            Fingerprints::load(path.clone())?.check(&self.files, start)?;
        }
        let mut offsets: HashMap<String, u64> = self
            .files
            .iter()
            .map(|f| (f.stream.clone(), start.get(&f.stream).copied().unwrap_or(0)))
            .collect();
        loop {
            for file in &self.files {
                let from = offsets.get(&file.stream).copied().unwrap_or(0);
                let Some(end) = self.read_file(file, from, out)? else {
                    return Ok(ReaderEnd::Done); // the sink loop has stopped
                };
                offsets.insert(file.stream.clone(), end);
            }
            if self.once {
                return Ok(ReaderEnd::Done);
            }
            // Daemon mode on files: wait for appended lines or new files.
            std::thread::sleep(self.poll);
            if out.stopped() {
                return Ok(ReaderEnd::Done);
            }
            if let Ok(files) = list_files(&self.root, self.follow_symlinks) {
                // A file this pass did not list at start has no committed positions loaded
                // (it may have been ingested before and moved back): end this pass so the
                // next one starts from what every sink has committed.
                if files.iter().any(|f| !offsets.contains_key(&f.stream)) {
                    return Ok(ReaderEnd::NewPass);
                }
                self.files = files;
            }
        }
    }
}
