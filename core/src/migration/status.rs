//! A live migration's progress and outcome, as the control API reports
//! them. Kept apart from the protocol (`live.rs`) so the running machine
//! (`vmcore.rs`) can hold it without depending on the protocol.

use serde::Serialize;

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting and agreeing on the plan; nothing is paused.
    #[default]
    Handshake,
    /// Copying memory while the guest runs.
    Precopy,
    /// The guest is paused here; the rest and the state are sent.
    StopAndCopy,
    /// The guest runs on the destination.
    Completed,
    /// Given up; the guest keeps running here.
    Failed,
    /// The plan was all that was asked for.
    DryRun,
}

/// Progress and outcome, as the API reports them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// handshake | precopy | stop-and-copy | completed | failed | dry-run.
    pub phase: Phase,
    /// How the VM travels: "mutual TLS 1.3", "PLAINTEXT TCP
    /// (--insecure-tcp: ...)", "unix socket".
    pub transport: String,
    /// The plan, one line per device.
    pub plan: Vec<String>,
    /// Current pre-copy round (0 = first pass).
    pub round: u32,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Guest memory dirtied per second in the last round.
    pub dirty_rate_bytes_per_s: f64,
    /// Link throughput in the last round.
    pub bandwidth_bytes_per_s: f64,
    /// The first pass (every non-zero page): bytes of pages sent, and its
    /// time from the first page read to the destination having written
    /// the last (end to end).
    pub first_pass_bytes: u64,
    /// See `first_pass_bytes`.
    pub first_pass_ms: f64,
    /// Expected downtime if stopping now.
    pub expected_downtime_ms: f64,
    /// How much the vCPUs are throttled, in percent (0: not at all); at
    /// the end, the highest throttle the migration needed.
    pub throttle_pct: u8,
    /// Total time, when finished.
    pub total_ms: f64,
    /// Measured downtime: source paused to destination's RESUMED.
    pub downtime_ms: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Finished (either way).
    pub done: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_read_as_the_api_has_always_spelled_them() {
        let names: Vec<String> = [
            Phase::Handshake,
            Phase::Precopy,
            Phase::StopAndCopy,
            Phase::Completed,
            Phase::Failed,
            Phase::DryRun,
        ]
        .iter()
        .map(|p| serde_json::to_value(p).unwrap_or_default().as_str().unwrap_or_default().to_string())
        .collect();
        assert_eq!(names, ["handshake", "precopy", "stop-and-copy", "completed", "failed", "dry-run"]);
    }
}
