//! Progress of long jobs (replays): a live line on a terminal, a periodic log line otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sluice_connectors::source::Behind;
use tracing::info;

/// How far behind the source's end the job is, e.g. `lag 12,000 messages, ETA 4 s` or `2.5 s
/// behind`.
fn describe(behind: &Behind, rate: f64) -> String {
    match behind {
        Behind::Messages(lag) => match lag.get() {
            Some(n) if rate > 0.0 => format!("lag {n} messages, ETA {:.0} s", n as f64 / rate),
            Some(n) => format!("lag {n} messages"),
            None => "lag unknown".into(),
        },
        Behind::Millis(ms) => match ms.load(Ordering::Relaxed) {
            ms if ms >= 0 => format!("{:.1} s behind the stream's end", ms as f64 / 1000.0),
            _ => "lag unknown".into(),
        },
    }
}

pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// Shows `events` (read so far), the rate and how far behind the job is until
    /// [`Progress::finish`].
    pub fn start(events: Arc<AtomicU64>, behind: Behind) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-progress".into())
            .spawn(move || {
                let started = Instant::now();
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} events ({per_sec}) {msg}")
                            .expect("valid template"),
                    );
                    while !flag.load(Ordering::Relaxed) {
                        let n = events.load(Ordering::Relaxed);
                        bar.set_position(n);
                        bar.set_message(describe(&behind, n as f64 / started.elapsed().as_secs_f64().max(0.001)));
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
                            info!(events = n, rate = rate.round() as u64, behind = %describe(&behind, rate), "replay progress");
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
