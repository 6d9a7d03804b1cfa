//! The `presence` binary: parses flags, sets up logging, and calls the library.

use std::io::{self, IsTerminal};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Prints a line on stdout; unlike `println!`, a closed stdout is an error
/// to return (and end quietly on), not a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(io::stdout(), $($arg)*)
    };
}

/// Exit code for errors (bad flags, no reply, ...). 1 is kept for "offline".
const EXIT_ERROR: u8 = 2;

mod cli;

use cli::args::{Cli, Command, LogFormat};

pub(crate) fn resolve(server: &str) -> Result<SocketAddr> {
    server
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve server address '{server}'"))?
        .next()
        .ok_or_else(|| anyhow!("'{server}' resolves to no address"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The NATS client's connection news is noise next to our own logs
        // (the sinks say when they cannot publish, and when they can again).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap's whole message: what is wrong, its tips, the usage and
            // the pointer to --help (or the help itself, for a bare `presence`).
            let _ = e.print();
            let code = if e.use_stderr() { EXIT_ERROR } else { 0 };
            return ExitCode::from(code);
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => cli::serve::serve(*args),
        Command::Beat(args) => cli::beat::beat(args),
        Command::Status(args) => cli::status::status(args),
        Command::Keygen(args) => cli::keys::keygen(args),
        Command::DeriveKey(args) => cli::keys::derive_key(args),
        Command::Watch(args) => cli::watch::watch(args),
    };
    match result {
        Ok(code) => code,
        // Whoever read our output went away (`presence status --list | head`): end quietly.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Whether `e` is (caused by) a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let io = match cause.downcast_ref::<presence::client::ClientError>() {
            Some(presence::client::ClientError::Io(io)) => Some(io),
            _ => cause.downcast_ref::<io::Error>(),
        };
        io.is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Starts a thread that turns SIGINT/SIGTERM into `on_signal` calls (once).
pub(crate) fn on_signal(on_signal: impl FnOnce() + Send + 'static) -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "stopping");
                on_signal();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
