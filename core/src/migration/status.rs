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
    /// The guest runs on the destination, which pulls the pages still
    /// here on first touch while the rest are pushed.
    Postcopy,
    /// Post-copy's connection broke: the source keeps the pages still
    /// here, the destination waits; `ferry ctl migrate --resume` goes on.
    PostcopyPaused,
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
    /// handshake | precopy | stop-and-copy | postcopy | postcopy-paused |
    /// completed | failed | dry-run.
    pub phase: Phase,
    /// What finished it: "pre-copy", "throttled" (pre-copy with the vCPUs
    /// slowed), "post-copy", or "memfd" (same host, nothing copied).
    pub mode: String,
    /// How the VM travels: "mutual TLS 1.3", "PLAINTEXT TCP
    /// (--insecure-tcp: ...)", "unix socket".
    pub transport: String,
    /// The plan, one line per device.
    pub plan: Vec<String>,
    /// Current pre-copy round (0 = first pass).
    pub round: u32,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Of `bytes_sent`, the guest's boot image (kernel, initramfs) that the
    /// destination's image store lacked; 0 when it held it.
    pub boot_image_bytes: u64,
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
    /// Post-copy: pages still on the source (0 once all moved).
    pub postcopy_pages_left: u64,
    /// Post-copy: pages sent after the switch-over, pushed or requested.
    pub postcopy_pages: u64,
    /// Post-copy: requests the destination's guest made by touching a
    /// page still here.
    pub postcopy_requests: u64,
    /// Post-copy: from the destination's RESUMED to its last page.
    pub postcopy_ms: f64,
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
            Phase::Postcopy,
            Phase::PostcopyPaused,
            Phase::Completed,
            Phase::Failed,
            Phase::DryRun,
        ]
        .iter()
        .map(|p| serde_json::to_value(p).unwrap_or_default().as_str().unwrap_or_default().to_string())
        .collect();
        assert_eq!(
            names,
            [
                "handshake",
                "precopy",
                "stop-and-copy",
                "postcopy",
                "postcopy-paused",
                "completed",
                "failed",
                "dry-run"
            ]
        );
    }
}
