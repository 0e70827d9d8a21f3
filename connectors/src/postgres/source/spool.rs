//! Snapshot spools: a table's snapshot read whole into an encrypted file (frames sealed under
//! the spool key, bound to slot, table, snapshot and place), then fed from any position.

use super::*;

/// Rows per encrypted spool frame.
const FRAME_ROWS: u64 = 1024;

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SpoolMeta {
    /// The transactions the snapshot saw.
    pub(super) snapshot: Snapshot,
    /// The WAL insert position read after the snapshot: a transaction committed at or past it
    /// is not in the snapshot.
    pub(super) snapshot_lsn: u64,
    pub(super) rows: u64,
    /// When the snapshot was read (the rows' event time).
    pub(super) read_ms: i64,
}

impl PostgresSource {
    /// A table's snapshot stream, qualified by the snapshot (its WAL position): positions of an
    /// earlier snapshot of the table can never be applied to a later one's rows.
    pub(super) fn snapshot_stream(&self, (schema, table): &(String, String), meta: &SpoolMeta) -> String {
        format!(
            "pg/{}/snapshot/{schema}.{table}@{:X}",
            self.o.settings.slot, meta.snapshot_lsn
        )
    }

    pub(super) fn spool_paths(&self, (schema, table): &(String, String)) -> (PathBuf, PathBuf) {
        // Escaped so that no two (schema, table) pairs share a file name.
        let escape = |s: &str| -> String {
            s.chars()
                .map(|c| match c {
                    c if c.is_ascii_alphanumeric() || c == '_' => c.to_string(),
                    c => format!("%{:X}", c as u32),
                })
                .collect()
        };
        let name = format!("{}.{}", escape(schema), escape(table));
        let dir = self.o.spool_dir.join(&self.o.settings.slot);
        (dir.join(format!("{name}.meta.json")), dir.join(format!("{name}.spool")))
    }

    pub(super) fn read_meta(&self, table: &(String, String)) -> Result<Option<SpoolMeta>, SourceError> {
        let (meta, _) = self.spool_paths(table);
        match std::fs::read(&meta) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| SourceError::Spool(format!("{}: {e}", meta.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SourceError::Spool(format!("{}: {e}", meta.display()))),
        }
    }

    /// Binds a frame to its slot, table, snapshot and place in the spool.
    pub(super) fn frame_aad(&self, table: &(String, String), snapshot_lsn: u64, frame: u64) -> Vec<u8> {
        format!(
            "sluice-spool\0{}\0{}\0{}\0{snapshot_lsn:X}\0{frame}",
            self.o.settings.slot, table.0, table.1
        )
        .into_bytes()
    }

    /// Reads the tables that have no spool yet into spools, under one snapshot.
    pub(super) fn build_spools(&mut self, tables: &[(String, String)]) -> Result<(), SourceError> {
        let control = self.control.as_ref().expect("connected in begin_pass");
        let exported = self.created.as_ref().map(|(_, name)| name.clone());
        let (snapshot, snapshot_lsn) = self.rt.block_on(pg::begin_snapshot(control, exported.as_deref()))?;
        let read_ms = chrono::Utc::now().timestamp_millis();
        for table in tables {
            let shape = self
                .rt
                .block_on(pg::table_shape(control, &table.0, &table.1, &self.types))?;
            let (meta_path, spool_path) = self.spool_paths(table);
            let dir = spool_path.parent().expect("spool dir");
            std::fs::create_dir_all(dir).map_err(|e| SourceError::Spool(format!("{}: {e}", dir.display())))?;
            // An earlier meta must never be paired with the spool written now.
            match std::fs::remove_file(&meta_path) {
                Ok(()) => File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| SourceError::Spool(format!("{}: {e}", dir.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SourceError::Spool(format!("{}: {e}", meta_path.display()))),
            }
            let partial = spool_path.with_extension("spool.partial");
            let io = |e: std::io::Error| SourceError::Spool(format!("{}: {e}", partial.display()));
            let mut file = BufWriter::new(File::create(&partial).map_err(io)?);
            let mut frame: Vec<u8> = Vec::new();
            let (mut rows, mut frames) = (0u64, 0u64);
            let source = EventSource {
                connector_name: &self.o.name,
                database: &self.o.settings.database,
                lsn: 0,
                xid: 0,
                commit_ms: read_ms,
                snapshot: true,
            };
            let key = self.o.spool_key.clone();
            let seal = |frame: &mut Vec<u8>, index: u64, file: &mut BufWriter<File>| -> std::io::Result<()> {
                let sealed = key
                    .seal(frame, &self.frame_aad(table, snapshot_lsn, index))
                    .map_err(|_| std::io::Error::other("spool encryption failed"))?;
                file.write_all(&(sealed.len() as u32).to_be_bytes())?;
                file.write_all(&sealed)?;
                frame.clear();
                Ok(())
            };
            let copied = self.rt.block_on(pg::copy_table(control, &shape, |line| {
                let fields = parse_copy_line(line);
                let datums: Vec<Datum<'_>> = fields
                    .iter()
                    .map(|f| match f {
                        None => Datum::Null,
                        Some(bytes) => Datum::Text(bytes),
                    })
                    .collect();
                write_event(&mut frame, b'r', &shape, None, Some(&datums), &source, read_ms);
                frame.push(b'\n');
                rows += 1;
                if rows % FRAME_ROWS == 0 {
                    seal(&mut frame, frames, &mut file)?;
                    frames += 1;
                }
                Ok(())
            }))?;
            debug_assert_eq!(copied, rows);
            if !frame.is_empty() {
                seal(&mut frame, frames, &mut file).map_err(io)?;
            }
            let file = file.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&partial, &spool_path).map_err(io)?;
            // The meta file is what marks a spool complete: written last, atomically.
            let meta = SpoolMeta {
                snapshot: snapshot.clone(),
                snapshot_lsn,
                rows,
                read_ms,
            };
            let tmp = meta_path.with_extension("json.partial");
            std::fs::write(&tmp, serde_json::to_vec(&meta).expect("meta serializes"))
                .and_then(|_| File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &meta_path))
                .and_then(|_| File::open(dir)?.sync_all())
                .map_err(|e| SourceError::Spool(format!("{}: {e}", meta_path.display())))?;
            info!(table = %format!("{}.{}", table.0, table.1), rows, "snapshot read into the spool");
        }
        self.rt
            .block_on(control.batch_execute("COMMIT"))
            .map_err(|e| PgError::Sql {
                what: "ending the snapshot transaction".into(),
                reason: pg::describe(&e),
            })?;
        // The exported snapshot is no longer needed: close the slot's creating session.
        // (Dropping a session that never started replication ends it.)
        drop(self.created.take());
        Ok(())
    }

    /// Feeds a table's spool from `from` (rows already taken) to its end.
    pub(super) fn feed_spool(
        &self,
        table: &(String, String),
        meta: &SpoolMeta,
        from: u64,
        out: &mut ChunkSender,
    ) -> Result<bool, SourceError> {
        let (_, path) = self.spool_paths(table);
        let io = |e: std::io::Error| SourceError::Spool(format!("{}: {e}", path.display()));
        let mut file = BufReader::new(File::open(&path).map_err(io)?);
        let stream: Arc<str> = Arc::from(self.snapshot_stream(table, meta).as_str());
        let mut chunk = Chunk::new(stream.clone(), self.o.chunk_events);
        let mut frame = from / FRAME_ROWS;
        for _ in 0..frame {
            let len = read_len(&mut file).map_err(io)?;
            file.seek(SeekFrom::Current(len as i64)).map_err(io)?;
        }
        let mut ordinal = frame * FRAME_ROWS;
        let mut sealed = Vec::new();
        let size = file.get_ref().metadata().map_err(io)?.len();
        while ordinal < meta.rows {
            let len = read_len(&mut file).map_err(io)?;
            if u64::from(len) > size.saturating_sub(file.stream_position().map_err(io)?) {
                return Err(SourceError::Spool(format!(
                    "{}: frame {frame} is cut short",
                    path.display()
                )));
            }
            sealed.resize(len as usize, 0);
            file.read_exact(&mut sealed).map_err(io)?;
            let plain = self
                .o
                .spool_key
                .open(&sealed, &self.frame_aad(table, meta.snapshot_lsn, frame))
                .map_err(|_| SourceError::Spool(format!("{}: frame {frame} does not decrypt", path.display())))?;
            for line in plain.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                ordinal += 1;
                if ordinal <= from {
                    continue;
                }
                chunk.push(
                    line,
                    LineEnd {
                        end_offset: ordinal,
                        len: line.len(),
                        terminated: true,
                    },
                );
                let full = chunk.lines.len() >= self.o.chunk_events || chunk.data.len() >= CHUNK_BYTES;
                if full
                    && !out.send(std::mem::replace(
                        &mut chunk,
                        Chunk::new(stream.clone(), self.o.chunk_events),
                    ))
                {
                    return Ok(false);
                }
            }
            frame += 1;
        }
        if ordinal != meta.rows {
            return Err(SourceError::Spool(format!(
                "{}: holds {ordinal} rows, its meta says {}",
                path.display(),
                meta.rows
            )));
        }
        Ok(chunk.lines.is_empty() || out.send(chunk))
    }
}

fn read_len(file: &mut impl Read) -> std::io::Result<u32> {
    let mut len = [0u8; 4];
    file.read_exact(&mut len)?;
    Ok(u32::from_be_bytes(len))
}
