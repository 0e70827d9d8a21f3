//! Graceful shutdown on SIGTERM / SIGINT: the reader stops reading, what was read is sanitized,
//! written and committed with its positions, the source is acknowledged, and the process exits
//! 0. If that takes longer than the timeout, or a second signal comes, it exits at once with
//! status 1: nothing is lost either way (what was not committed is read again on restart).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a shutdown was asked for: readers end their pass, daemons their loops.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Handles SIGTERM and SIGINT from now on.
pub fn install(timeout: Duration) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("sluice-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
                if REQUESTED.swap(true, Ordering::SeqCst) {
                    error!(
                        signal = name,
                        "second signal: exiting now (uncommitted work is read again on restart)"
                    );
                    std::process::exit(1);
                }
                info!(
                    signal = name,
                    timeout_ms = timeout.as_millis() as u64,
                    "shutting down: stop reading, commit what was read, exit"
                );
                std::thread::spawn(move || {
                    std::thread::sleep(timeout);
                    error!(
                        timeout_ms = timeout.as_millis() as u64,
                        "shutdown timed out: exiting (uncommitted work is read again on restart)"
                    );
                    std::process::exit(1);
                });
            }
        })?;
    Ok(())
}
