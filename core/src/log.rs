//! Ferry's log: one line per message on stderr, prefixed `ferry:`.
//! `FERRY_LOG=error|warn|info|debug` sets the level (default `warn`).

use std::{sync::OnceLock, time::Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Remember when ferry started (call first thing in main).
pub fn mark_start() {
    let _ = START.set(Instant::now());
}

/// Milliseconds since `mark_start`.
pub fn since_start_ms() -> f64 {
    START.get().map(|s| s.elapsed().as_secs_f64() * 1e3).unwrap_or(0.0)
}

/// Is the level debug? For a debug line whose formatting should not run
/// otherwise (one on the pause's path).
pub fn debugging() -> bool {
    LogLevel::DEBUG <= level()
}

/// At debug level: `what` is done, this many milliseconds after ferry
/// started (how restore and boot say where their time goes).
pub fn step(what: &str) {
    if debugging() {
        debug(&format!("{what} at {:.2} ms", since_start_ms()));
    }
}

use ferry_plugin_api::LogLevel;

fn level() -> LogLevel {
    static LEVEL: OnceLock<LogLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("FERRY_LOG").as_deref() {
        Ok("error") => LogLevel::ERROR,
        Ok("info") => LogLevel::INFO,
        Ok("debug") => LogLevel::DEBUG,
        _ => LogLevel::WARN,
    })
}

/// Log at `lvl`.
pub fn log(lvl: LogLevel, msg: &str) {
    if lvl <= level() {
        let tag = match lvl {
            LogLevel::ERROR => "error",
            LogLevel::WARN => "warning",
            LogLevel::INFO => "info",
            _ => "debug",
        };
        eprintln!("ferry: {tag}: {msg}");
    }
}

/// Log an informational message.
pub fn info(msg: &str) {
    log(LogLevel::INFO, msg);
}

/// Log a warning.
pub fn warn(msg: &str) {
    log(LogLevel::WARN, msg);
}

/// Log a debug message.
pub fn debug(msg: &str) {
    log(LogLevel::DEBUG, msg);
}
