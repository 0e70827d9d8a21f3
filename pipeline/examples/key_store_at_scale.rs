//! Benchmark (not a test): the key store holding a large book. Fills a store with the keys of
//! `N` subjects — the customers `sluice generate --subjects N` writes events for (ids `0..N`,
//! tokenized in the `customer` domain as the demo policies do) — then looks up a day's worth of
//! them at random, in chunks as the workers do, with the daemon's default memory budget.
//! Prints one JSON line. A benchmark run over such a store meets existing keys, as a daemon
//! that has run for years does.
//!
//! Usage: cargo run --release -p sluice --example key_store_at_scale --
//!        STORE MASTER_KEY_FILE SUBJECTS [LOOKUPS]

use std::time::Instant;

use sluice_connectors::keystore::{KeyStore, KeyStoreLocation, MasterKey};
use sluice_transforms::keys::KeyProvider;

/// The daemon's default key-store share of `[workers] memory_mb` (192 MiB / 4).
const MEMORY: usize = 48 << 20;
/// Distinct subjects a chunk of 4,096 events names at this cardinality (measured).
const CHUNK_SUBJECTS: usize = 1_400;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, store, master, subjects, rest @ ..] = args.as_slice() else {
        return Err("usage: key_store_at_scale STORE MASTER_KEY_FILE SUBJECTS [LOOKUPS]".into());
    };
    let subjects: u64 = subjects.parse()?;
    let lookups: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(350_000);
    let location = KeyStoreLocation::Sqlite(store.into());
    let open = || -> Result<KeyStore, Box<dyn std::error::Error>> {
        Ok(KeyStore::open(
            &location,
            MasterKey::from_hex(&std::fs::read_to_string(master)?)?,
            MEMORY,
        )?)
    };
    let keys = open()?;
    let customer = keys.tokenizer()?.domain("customer");
    let token = |id: u64| customer.token(&id.to_string()).as_str().to_string();

    // Filled in token order, as years of inserts leave a B-tree: appends, so the fill is quick.
    let before = keys.subject_count()?;
    let started = Instant::now();
    if before < subjects {
        let mut tokens: Vec<String> = (0..subjects).map(token).collect();
        tokens.sort_unstable();
        for batch in tokens.chunks(100_000) {
            let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
            keys.subject_keys(&batch)?;
            keys.sync()?;
        }
    }
    let fill_s = started.elapsed().as_secs_f64();
    drop(keys);

    // A day of changes: random subjects of the book, chunk by chunk, from a cold cache.
    let keys = open()?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % subjects
    };
    let chosen: Vec<String> = (0..lookups).map(|_| token(next())).collect();
    let started = Instant::now();
    for chunk in chosen.chunks(CHUNK_SUBJECTS) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        keys.subject_keys(&chunk)?;
    }
    let lookup_s = started.elapsed().as_secs_f64();
    let (hits, misses) = keys.cache_stats();
    println!(
        "{{\"subjects\": {}, \"filled\": {}, \"fill_s\": {:.1}, \"lookups\": {lookups}, \"lookup_s\": {lookup_s:.2}, \"lookups_per_s\": {:.0}, \"cache_hits\": {hits}, \"cache_misses\": {misses}, \"store_mb\": {:.0}}}",
        keys.subject_count()?,
        subjects.saturating_sub(before),
        fill_s,
        lookups as f64 / lookup_s,
        std::fs::metadata(store)?.len() as f64 / 1e6,
    );
    Ok(())
}
