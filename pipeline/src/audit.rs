//! `sluice audit-leaks`: proves that known sensitive values appear nowhere in what was written.
//!
//! A value counts as leaked if it appears in any letter case, as its digits alone, as base64 or
//! hex of its bytes, or as an unkeyed MD5/SHA-1/SHA-256/SHA-512 digest (hex or base64). Parquet
//! files are decoded (every column, as text or raw bytes) and also scanned raw (footers hold
//! statistics); gzip files are decompressed. Hits name the file, the value's line number in the
//! values file and the form; never the value itself.

use std::io::Read;
use std::path::{Path, PathBuf};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use anyhow::{Context, Result};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use md5::Digest;
use ring::digest;
use sluice_connectors::arrow::array::{Array, BinaryArray, LargeBinaryArray, StringArray};
use sluice_connectors::arrow::compute::cast;
use sluice_connectors::arrow::datatypes::DataType;
use sluice_connectors::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Values shorter than this are too common to search for meaningfully.
const MIN_VALUE_LEN: usize = 6;
/// Digit-only forms need at least this many digits.
const MIN_DIGITS: usize = 7;

pub struct Hit {
    pub file: PathBuf,
    pub value_line: usize,
    pub form: &'static str,
}

pub struct Report {
    pub files: usize,
    pub bytes: u64,
    pub values: usize,
    pub patterns: usize,
    pub hits: Vec<Hit>,
}

impl Report {
    pub fn render(&self) -> String {
        let mut s = format!(
            "scanned {} files ({} bytes decoded) for {} values in {} forms\n",
            self.files, self.bytes, self.values, self.patterns
        );
        for h in &self.hits {
            s.push_str(&format!(
                "LEAK {}: value on line {} of the values file, as {}\n",
                h.file.display(),
                h.value_line,
                h.form
            ));
        }
        s.push_str(if self.hits.is_empty() {
            "no leaks found\n"
        } else {
            "LEAKS FOUND\n"
        });
        s
    }
}

struct Needles {
    insensitive: AhoCorasick,
    insensitive_meta: Vec<(usize, &'static str)>,
    sensitive: AhoCorasick,
    sensitive_meta: Vec<(usize, &'static str)>,
}

fn build_needles(values: &[(usize, String)]) -> Result<Needles> {
    let mut ci: Vec<(Vec<u8>, usize, &'static str)> = Vec::new();
    let mut cs: Vec<(Vec<u8>, usize, &'static str)> = Vec::new();
    for (line, v) in values {
        let b = v.as_bytes();
        ci.push((b.to_vec(), *line, "plain text"));
        let digits: String = v.chars().filter(char::is_ascii_digit).collect();
        if digits.len() >= MIN_DIGITS && digits != *v {
            ci.push((digits.into_bytes(), *line, "digits only"));
        }
        ci.push((hex::encode(b).into_bytes(), *line, "hex"));
        cs.push((
            STANDARD.encode(b).trim_end_matches('=').as_bytes().to_vec(),
            *line,
            "base64",
        ));
        cs.push((URL_SAFE_NO_PAD.encode(b).into_bytes(), *line, "base64url"));
        let digests: [(&'static str, &'static str, Vec<u8>); 4] = [
            ("md5 hex", "md5 base64", md5::Md5::digest(b).to_vec()),
            (
                "sha1 hex",
                "sha1 base64",
                digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, b).as_ref().to_vec(),
            ),
            (
                "sha256 hex",
                "sha256 base64",
                digest::digest(&digest::SHA256, b).as_ref().to_vec(),
            ),
            (
                "sha512 hex",
                "sha512 base64",
                digest::digest(&digest::SHA512, b).as_ref().to_vec(),
            ),
        ];
        for (hex_form, b64_form, d) in digests {
            ci.push((hex::encode(&d).into_bytes(), *line, hex_form));
            cs.push((STANDARD_NO_PAD.encode(&d).into_bytes(), *line, b64_form));
        }
    }
    let build = |pats: &[(Vec<u8>, usize, &'static str)], insensitive: bool| {
        AhoCorasickBuilder::new()
            .ascii_case_insensitive(insensitive)
            .match_kind(MatchKind::Standard)
            .build(pats.iter().map(|p| &p.0))
    };
    Ok(Needles {
        insensitive: build(&ci, true)?,
        insensitive_meta: ci.iter().map(|p| (p.1, p.2)).collect(),
        sensitive: build(&cs, false)?,
        sensitive_meta: cs.iter().map(|p| (p.1, p.2)).collect(),
    })
}

pub fn scan(values_file: &Path, paths: &[PathBuf]) -> Result<Report> {
    let text = std::fs::read_to_string(values_file).with_context(|| format!("reading {}", values_file.display()))?;
    let values: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| l.len() >= MIN_VALUE_LEN)
        .collect();
    let needles = build_needles(&values)?;
    let mut report = Report {
        files: 0,
        bytes: 0,
        values: values.len(),
        patterns: needles.insensitive_meta.len() + needles.sensitive_meta.len(),
        hits: Vec::new(),
    };
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files).with_context(|| format!("listing {}", p.display()))?;
    }
    for file in files {
        let raw = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let mut views = vec![raw];
        if views[0].starts_with(b"PAR1") {
            views.push(decode_parquet(&file).with_context(|| format!("decoding Parquet {}", file.display()))?);
        } else if views[0].starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(views[0].as_slice())
                .read_to_end(&mut out)
                .with_context(|| format!("decompressing {}", file.display()))?;
            views.push(out);
        }
        report.files += 1;
        let mut seen = std::collections::BTreeSet::new();
        for view in &views {
            report.bytes += view.len() as u64;
            for m in needles.insensitive.find_overlapping_iter(view.as_slice()) {
                seen.insert(needles.insensitive_meta[m.pattern().as_usize()]);
            }
            for m in needles.sensitive.find_overlapping_iter(view.as_slice()) {
                seen.insert(needles.sensitive_meta[m.pattern().as_usize()]);
            }
        }
        report.hits.extend(seen.into_iter().map(|(value_line, form)| Hit {
            file: file.clone(),
            value_line,
            form,
        }));
    }
    Ok(report)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            collect_files(&e, out)?;
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Every value of every column, text as text and binary as raw bytes, one per line.
fn decode_parquet(path: &Path) -> Result<Vec<u8>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        for column in batch.columns() {
            match column.data_type() {
                DataType::Binary => {
                    let a = column.as_any().downcast_ref::<BinaryArray>().expect("binary");
                    a.iter().flatten().for_each(|v| {
                        out.extend_from_slice(v);
                        out.push(b'\n')
                    });
                }
                DataType::LargeBinary => {
                    let a = column
                        .as_any()
                        .downcast_ref::<LargeBinaryArray>()
                        .expect("large binary");
                    a.iter().flatten().for_each(|v| {
                        out.extend_from_slice(v);
                        out.push(b'\n')
                    });
                }
                _ => match cast(column, &DataType::Utf8) {
                    Ok(text) => {
                        let a = text.as_any().downcast_ref::<StringArray>().expect("utf8");
                        a.iter().flatten().for_each(|v| {
                            out.extend_from_slice(v.as_bytes());
                            out.push(b'\n')
                        });
                    }
                    // Nested columns (a Delta checkpoint's `add` struct, its `stats` inside):
                    // their display form holds every nested value as text.
                    Err(_) => {
                        use std::io::Write;
                        let options = sluice_connectors::arrow::util::display::FormatOptions::default();
                        let shown = sluice_connectors::arrow::util::display::ArrayFormatter::try_new(
                            column.as_ref(),
                            &options,
                        )?;
                        for i in (0..column.len()).filter(|i| column.is_valid(*i)) {
                            let _ = writeln!(out, "{}", shown.value(i));
                        }
                    }
                },
            }
        }
    }
    Ok(out)
}
