//! Crash points for the Rust tests of the exactly-once core (cargo feature `failpoints`): a test
//! arms one by name; the run panics when it reaches it, as a crash there would stop it (what
//! was committed stays, the rest is lost with the process). Without the feature there is
//! nothing here, and the call sites compile away with it.
//! The end-to-end tests crash the real binary with kill -9 and `SLUICE_FAILPOINT` instead.

#[cfg(feature = "failpoints")]
static ARMED: std::sync::Mutex<Option<(String, usize)>> = std::sync::Mutex::new(None);

/// Panics at the `skip + 1`-th time `name` is reached from now on.
#[cfg(feature = "failpoints")]
pub fn arm(name: &str, skip: usize) {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = Some((name.to_string(), skip));
}

/// Reached `name`: panics if a test armed it (once).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, skip)) = armed.as_mut() {
        if at == name {
            if *skip == 0 {
                *armed = None;
                drop(armed);
                panic!("failpoint {name}");
            }
            *skip -= 1;
        }
    }
}
