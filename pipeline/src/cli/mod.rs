//! The `sluice` command line: [`main`] parses the arguments, sets logging and the panic hook
//! up, and hands each subcommand to its file.

mod args;
mod forget;
mod jobs;
mod replay;
mod reveal;
mod run;
mod service;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, LogFormat};

/// Runs the command line; the exit code is the process's.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    install_panic_hook();
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(2)
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run::run(args),
        Command::Capture(args) => run::capture(args),
        Command::Replay(args) => replay::replay(args),
        Command::Forget(args) => forget::forget(args),
        Command::ReuseSubject(args) => forget::reuse_subject(args),
        Command::Aggregate(args) => jobs::aggregate(args),
        Command::Compact { config } => jobs::compact(&config),
        Command::Check {
            config,
            tables,
            tags_json,
        } => jobs::check(&config, tables, tags_json),
        Command::Reveal(command) => reveal::reveal(command),
        Command::Audit { config, json } => reveal::audit(&config, json),
        Command::Retain { config, dry_run } => jobs::retain(&config, dry_run),
        Command::Generate(args) => jobs::generate(args),
        Command::AuditLeaks(args) => jobs::audit_leaks(args),
    }
}

/// The error and its causes, skipping a cause whose text the message already carries.
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// A panic that nothing handles where it happens (a sanitizer panic is handled: its event is
/// quarantined) stops the process at once, exit code 70, with one error line: a supervisor
/// restarts it, and nothing half-done was committed (commits are atomic). A process that hung
/// on with a dead thread would look healthy while doing nothing. The panic's own message is
/// not shown: it could quote data.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let current = std::thread::current();
        let thread = current.name().unwrap_or("unnamed");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if crate::worker::panic_is_caught() {
            tracing::warn!(thread, at = %at, "panic while sanitizing a chunk: its events are done again one by one");
            return;
        }
        tracing::error!(thread, at = %at, "panic: stopping with exit code 70 (its message is not shown: it could quote data)");
        std::process::exit(70);
    }));
}

fn init_logging(format: LogFormat) {
    // The Delta kernel logs "no files in log segment" at error level while creating a table;
    // its real failures reach us as errors anyway.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| "info,deltalake=warn,deltalake_core=error,buoyant_kernel=off".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
