//! Progress of long jobs (replays): a live line on a terminal, a periodic log line otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// Shows `events` (read so far) and the rate until [`Progress::finish`].
    pub fn start(events: Arc<AtomicU64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-progress".into())
            .spawn(move || {
                let started = Instant::now();
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} events ({per_sec})")
                            .expect("valid template"),
                    );
                    while !flag.load(Ordering::Relaxed) {
                        bar.set_position(events.load(Ordering::Relaxed));
                        std::thread::park_timeout(Duration::from_millis(200));
                    }
                    bar.finish_and_clear();
                } else {
                    let mut last = Instant::now();
                    while !flag.load(Ordering::Relaxed) {
                        std::thread::park_timeout(Duration::from_millis(200));
                        if last.elapsed() >= LOG_EVERY {
                            last = Instant::now();
                            let n = events.load(Ordering::Relaxed);
                            let rate = n as f64 / started.elapsed().as_secs_f64().max(0.001);
                            info!(events = n, rate = rate.round() as u64, "replay progress");
                        }
                    }
                }
            })
            .ok();
        Self { stop, thread }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
