use super::*;
use sluice_transforms::crypto::{envelope_key_id, field_aad};

const MASTER: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn open(path: &std::path::Path) -> KeyStore {
    KeyStore::open(
        &KeyStoreLocation::Sqlite(path.to_path_buf()),
        MasterKey::from_hex(MASTER).unwrap(),
        2,
    )
    .unwrap()
}

use sluice_transforms::counting_alloc as counting;

#[global_allocator]
static COUNTING: counting::Counting = counting::Counting;

#[test]
fn the_key_cache_costs_what_its_budget_assumes() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 8 << 20;
    let store = KeyStore::open(
        &KeyStoreLocation::Sqlite(dir.path().join("keys.db")),
        MasterKey::from_hex(MASTER).unwrap(),
        budget,
    )
    .unwrap();
    let capacity = store.cache.lock().unwrap().cap().get();
    // Tokens as the tokenizer writes them: 32 hex characters.
    let tokens: Vec<String> = (0..capacity).map(|i| format!("{i:032x}")).collect();
    let wanted: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let before = counting::allocated_here();
    for batch in wanted.chunks(4096) {
        store.subject_keys(batch).unwrap();
    }
    let held = counting::allocated_here() - before;
    assert_eq!(store.cache.lock().unwrap().len(), capacity, "the cache is full");
    assert!(
        held as usize <= budget * 3 / 4,
        "{capacity} cached keys hold {held} bytes, over the {} the budget gives them",
        budget * 3 / 4
    );
}

#[test]
fn a_key_moved_to_another_owner_does_not_unwrap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let sql = |statement: &str| {
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(statement)
            .unwrap();
    };
    {
        let store = open(&path);
        store.subject_keys(&["a", "b", "c"]).unwrap();
        store.tokenizer().unwrap();
    }
    // Someone who can write the store, without the master key: swaps two subjects' keys…
    sql("UPDATE subject_keys SET key_id = (SELECT key_id FROM subject_keys WHERE token = 'b') WHERE token = 'a';");
    assert!(open(&path).subject_keys(&["a"]).is_err(), "b's key for a's data");
    // …or points the token key at a subject's.
    sql("UPDATE system_keys SET key_id = (SELECT key_id FROM subject_keys WHERE token = 'c') WHERE name = 'token';");
    assert!(open(&path).tokenizer().is_err());
    assert!(open(&path).subject_keys(&["c"]).is_ok(), "the key itself is intact");
}

#[test]
fn keys_of_an_older_sluice_are_rewrapped_bound_to_their_owners() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let before = open(&path).subject_keys(&["a"]).unwrap()[0].clone().unwrap();
    let envelope = before.seal(b"secret", b"ctx").unwrap();
    // As an older sluice wrapped it: bound to the key id only, and no marker.
    {
        let store = open(&path);
        let Backend::Sqlite(db) = &mut *store.db.lock().unwrap() else {
            unreachable!()
        };
        let stored = db.wrapped_by_id(before.id()).unwrap().unwrap();
        let (id, material) = store
            .master
            .unwrap_material(&stored.id, &stored.wrapped, (Names::Subjects, "a"))
            .unwrap();
        let legacy = store.master.0.seal(&material, &legacy_wrap_aad(&id)).unwrap();
        db.replace_wrapped(&id, &stored.wrapped, &legacy).unwrap();
    }
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM system_keys WHERE name = ?1", [REWRAPPED_MARKER])
        .unwrap();
    let store = open(&path);
    let after = store.subject_keys(&["a"]).unwrap()[0].clone().unwrap();
    assert_eq!(after.open(&envelope, b"ctx").unwrap(), b"secret");
    let Backend::Sqlite(db) = &mut *store.db.lock().unwrap() else {
        unreachable!()
    };
    assert!(db.has_system_name(REWRAPPED_MARKER).unwrap());
}

#[test]
fn keys_persist_are_per_subject_and_need_the_right_master() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let envelope;
    let token_a;
    {
        let store = open(&path);
        let keys = store.subject_keys(&["a", "b", "a"]).unwrap();
        let keys: Vec<_> = keys.into_iter().map(Option::unwrap).collect();
        assert_eq!(keys[0].id(), keys[2].id());
        assert_ne!(keys[0].id(), keys[1].id());
        envelope = keys[0].seal(b"secret", &field_aad("t", "c", "a")).unwrap();
        token_a = store.tokenizer().unwrap().domain("d").token("1");
        assert_eq!(store.subject_count().unwrap(), 2);
    }
    let store = open(&path);
    let again = store.subject_keys(&["a"]).unwrap().remove(0).unwrap();
    assert_eq!(again.open(&envelope, &field_aad("t", "c", "a")).unwrap(), b"secret");
    // The owner of the master key can open any envelope from its key id alone.
    let by_id = store.key_by_id(&envelope_key_id(&envelope).unwrap()).unwrap().unwrap();
    assert_eq!(by_id.open(&envelope, &field_aad("t", "c", "a")).unwrap(), b"secret");
    assert!(store.key_by_id(&[9; KEY_ID_LEN]).unwrap().is_none());
    assert_eq!(
        store.tokenizer().unwrap().domain("d").token("1"),
        token_a,
        "token key persists"
    );
    drop(store);
    let other = MASTER.replace("00", "ff");
    assert!(matches!(
        KeyStore::open(
            &KeyStoreLocation::Sqlite(path.clone()),
            MasterKey::from_hex(&other).unwrap(),
            2
        ),
        Err(KeyStoreError::WrongMasterKey(_))
    ));
    assert!(MasterKey::from_hex("abcd").is_err());
}

#[test]
fn erasure_destroys_the_key_everywhere_and_blocks_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = open(&path).with_erasure_refresh(Duration::ZERO);
    let key = store.subject_keys(&["gone", "kept"]).unwrap();
    let id = *key[0].as_ref().unwrap().id();
    let envelope = key[0].as_ref().unwrap().seal(b"secret", b"ctx").unwrap();
    // The wrapped key as stored, to look for its bytes in the files afterwards.
    let wrapped = match &mut *store.db.lock().unwrap() {
        Backend::Sqlite(db) => db.wrapped_by_id(&id).unwrap().unwrap().wrapped,
        Backend::Postgres(_) => unreachable!(),
    };
    assert_eq!(store.erased(&["gone"]).unwrap(), vec![None]);

    let destroyed = store.erase_subjects("job-1", &["gone".to_string()], 1).unwrap();
    assert_eq!(destroyed, KeysDestroyed { keys: 1, tombstones: 1 });
    // Idempotent: a rerun reports what the job destroyed; another job finds nothing.
    assert_eq!(
        store.erase_subjects("job-1", &["gone".to_string()], 2).unwrap(),
        KeysDestroyed { keys: 1, tombstones: 1 }
    );
    assert_eq!(
        store.erase_subjects("job-2", &["gone".to_string()], 3).unwrap(),
        KeysDestroyed::default()
    );
    assert!(store.key_by_id(&id).unwrap().is_none());
    assert_eq!(
        store.erased(&["gone", "kept"]).unwrap(),
        vec![Some(ERASED_FOR_GOOD), None]
    );
    let after = store.subject_keys(&["gone", "kept"]).unwrap();
    assert!(after[0].is_none(), "an erased subject never gets a new key");
    assert!(after[1].is_some());
    assert!(store.key_by_id(&envelope_key_id(&envelope).unwrap()).unwrap().is_none());
    drop(store);
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(wrapped.len()).any(|w| w == wrapped.as_slice()),
            "the wrapped key's bytes are gone from the store's files"
        );
    }
}

#[test]
fn a_released_subject_gets_a_new_key_for_later_events_and_a_second_erasure_is_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("keys.db")).with_erasure_refresh(Duration::ZERO);
    let first = store.subject_keys(&["s"]).unwrap()[0].clone().unwrap();
    assert!(
        !store.release_subject("s", 5).unwrap(),
        "not erased: nothing to release"
    );
    store.erase_subjects("job-1", &["s".to_string()], 1).unwrap();
    assert_eq!(store.erased(&["s"]).unwrap(), vec![Some(ERASED_FOR_GOOD)]);
    assert!(store.release_subject("s", 1_000).unwrap());
    assert_eq!(store.erased(&["s"]).unwrap(), vec![Some(1_000)]);
    let second = store.subject_keys(&["s"]).unwrap()[0].clone().unwrap();
    assert_ne!(first.id(), second.id(), "a new key: the destroyed one stays destroyed");
    let destroyed = store.erase_subjects("job-2", &["s".to_string()], 2_000).unwrap();
    assert_eq!(destroyed, KeysDestroyed { keys: 1, tombstones: 1 });
    assert_eq!(store.erased(&["s"]).unwrap(), vec![Some(ERASED_FOR_GOOD)]);
    assert!(store.subject_keys(&["s"]).unwrap()[0].is_none());
}

#[test]
fn job_state_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("keys.db"));
    assert_eq!(store.job_state("j").unwrap(), None);
    store.save_job_state("j", "{\"step\":1}", 5).unwrap();
    store.save_job_state("j", "{\"step\":2}", 6).unwrap();
    assert_eq!(store.job_state("j").unwrap().as_deref(), Some("{\"step\":2}"));
}

#[test]
fn a_job_state_is_replaced_only_if_nobody_changed_it_since_it_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("keys.db"));
    assert!(store.replace_job_state("j", None, "a", 1).unwrap());
    assert!(
        !store.replace_job_state("j", None, "b", 2).unwrap(),
        "created by someone else first"
    );
    assert!(store.replace_job_state("j", Some("a"), "c", 3).unwrap());
    assert!(
        !store.replace_job_state("j", Some("a"), "d", 4).unwrap(),
        "read before the last change"
    );
    assert_eq!(store.job_state("j").unwrap().as_deref(), Some("c"));
}

#[test]
fn shredding_destroys_the_key_and_lets_any_later_event_have_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("keys.db")).with_erasure_refresh(Duration::ZERO);
    let first = store.subject_keys(&["s", "kept"]).unwrap()[0].clone().unwrap();
    let destroyed = store.shred_keys("retention-1", &["s".to_string()], 10).unwrap();
    assert_eq!(destroyed, KeysDestroyed { keys: 1, tombstones: 1 });
    assert!(store.key_by_id(first.id()).unwrap().is_none());
    // Released from the beginning of time: no event of theirs is dropped (not even remembered
    // as erased), none finds the old key.
    assert_eq!(store.erased(&["s", "kept"]).unwrap(), vec![None, None]);
    // Shredding again (a resumed run) changes nothing and reports what the job destroyed.
    assert_eq!(
        store.shred_keys("retention-1", &["s".to_string()], 11).unwrap(),
        KeysDestroyed { keys: 1, tombstones: 1 }
    );
    let second = store.subject_keys(&["s"]).unwrap()[0].clone().unwrap();
    assert_ne!(first.id(), second.id());
    // An erasure later is for good, as for any subject.
    store.erase_subjects("job-1", &["s".to_string()], 20).unwrap();
    assert_eq!(store.erased(&["s"]).unwrap(), vec![Some(ERASED_FOR_GOOD)]);
}

#[test]
fn shredding_leaves_an_erased_or_released_subjects_tombstone_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("keys.db")).with_erasure_refresh(Duration::ZERO);
    store.subject_keys(&["erased", "released"]).unwrap();
    store
        .erase_subjects("job-1", &["erased".to_string(), "released".to_string()], 1)
        .unwrap();
    assert!(store.release_subject("released", 1_000).unwrap());
    let newer = store.subject_keys(&["released"]).unwrap()[0].clone().unwrap();
    let destroyed = store
        .shred_keys("retention-1", &["erased".to_string(), "released".to_string()], 2_000)
        .unwrap();
    assert_eq!(destroyed, KeysDestroyed::default());
    assert_eq!(
        store.erased(&["erased", "released"]).unwrap(),
        vec![Some(ERASED_FOR_GOOD), Some(1_000)],
        "the erasure and the release's cut-off stay"
    );
    assert!(store.key_by_id(newer.id()).unwrap().is_some());
}
