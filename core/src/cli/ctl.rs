//! `ferry ctl`: the control API's client, and a migration followed to
//! its end with a progress line.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use clap::Subcommand;

use super::{args::bandwidth, hosts::read_host_manifest};

#[derive(Subcommand)]
pub(crate) enum CtlAction {
    /// State, machine type, devices.
    Info,
    /// Pause the guest.
    Pause,
    /// Resume the guest.
    Resume,
    /// Write a snapshot (the guest pauses while it is written).
    Snapshot {
        /// Where.
        file: PathBuf,
        /// Write it for another host (its `ferry plugins --manifest` file):
        /// older device state versions where that host needs them.
        #[arg(long, value_name = "HOST.json")]
        target: Option<PathBuf>,
    },
    /// End the VM.
    Shutdown,
    /// Move the VM live to another ferry (`ferry run --incoming URI`).
    Migrate {
        /// tcp:HOST:PORT or unix:PATH.
        uri: String,
        /// Downtime limit in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = ferry::migration::converge::DEFAULT_MAX_DOWNTIME_MS)]
        max_downtime: u64,
        /// Print the destination's plan and stop; nothing is paused.
        #[arg(long)]
        dry_run: bool,
        /// Send memory at most this fast while the guest runs, per second
        /// (such as 100M); the stop-and-copy goes at full speed. A guest
        /// that dirties memory faster is throttled.
        #[arg(long, value_name = "SIZE", value_parser = bandwidth)]
        max_bandwidth: Option<u64>,
        /// tcp: with mutual TLS, using this host's TLS directory
        /// (`ferry tls init`): ca-cert.pem, client-cert.pem, client-key.pem.
        #[arg(long, value_name = "DIR", conflicts_with = "insecure_tcp")]
        tls_dir: Option<PathBuf>,
        /// The name the destination's certificate must carry (default: the
        /// host in the URI).
        #[arg(long, value_name = "NAME", requires = "tls_dir")]
        tls_name: Option<String>,
        /// tcp: without TLS: the VM travels unencrypted to a peer nobody
        /// authenticated. For trusted networks only.
        #[arg(long)]
        insecure_tcp: bool,
        /// If the guest outruns the link, move it at once and the rest of
        /// its memory after it (post-copy) instead of throttling it. Refused
        /// before anything moves if the destination cannot.
        #[arg(long)]
        postcopy: bool,
        /// Reconnect a post-copy whose connection broke, to URI (the
        /// destination listens again on its --incoming address). Answers at
        /// once; the `ferry ctl migrate` that started the migration reports
        /// its end.
        #[arg(long, conflicts_with_all = ["postcopy", "dry_run"])]
        resume: bool,
    },
    /// Give up a running migration; the guest keeps running here.
    MigrateCancel,
}

pub(crate) fn ctl(socket: &std::path::Path, action: CtlAction) -> Result<ExitCode> {
    use ferry::api::{ApiRequest, MigrateRequest, SnapshotRequest};
    // The server resolves relative paths against its own directory.
    let absolute = |p: &PathBuf| std::path::absolute(p).with_context(|| format!("bad path {}", p.display()));
    let req = match action {
        CtlAction::Migrate {
            uri,
            max_downtime,
            dry_run,
            max_bandwidth,
            tls_dir,
            tls_name,
            insecure_tcp,
            postcopy,
            resume,
        } => {
            let tls_dir = tls_dir.as_ref().map(absolute).transpose()?;
            let req = MigrateRequest {
                uri,
                max_downtime_ms: max_downtime,
                dry_run,
                max_bandwidth,
                tls_dir,
                tls_name,
                insecure_tcp,
                postcopy,
                resume,
            };
            if resume {
                // The `ferry ctl migrate` that started it follows it to the end.
                let value = answer(ferry::api::send(socket, &ApiRequest::Migrate(req)))?;
                println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            return migrate(socket, &ApiRequest::Migrate(req));
        }
        CtlAction::MigrateCancel => ApiRequest::MigrateCancel,
        CtlAction::Info => ApiRequest::Info,
        CtlAction::Pause => ApiRequest::Pause,
        CtlAction::Resume => ApiRequest::Resume,
        CtlAction::Shutdown => ApiRequest::Shutdown,
        CtlAction::Snapshot { file, target } => {
            let target = target.as_ref().map(|t| read_host_manifest(t).map(Box::new)).transpose()?;
            ApiRequest::Snapshot(SnapshotRequest { path: absolute(&file)?, target })
        }
    };
    let value = answer(ferry::api::send(socket, &req))?;
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

/// The JSON of a successful answer, or its error as ours.
fn answer(result: Result<(u16, serde_json::Value), ferry::api::CallError>) -> Result<serde_json::Value> {
    let (status, value) = result.map_err(|e| anyhow!(e))?;
    if !(200..300).contains(&status) {
        return Err(anyhow!("{}", value.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error")));
    }
    Ok(value)
}

/// Start a migration through the API and follow it with a progress bar.
fn migrate(socket: &std::path::Path, req: &ferry::api::ApiRequest) -> Result<ExitCode> {
    answer(ferry::api::send(socket, req))?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let final_status = loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_, s) =
            ferry::api::send(socket, &ferry::api::ApiRequest::MigrationStatus).map_err(|e| anyhow!(e))?;
        let get = |k: &str| s.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        bar.set_message(format!(
            "{} round {} | {:.1} MiB sent | dirty {:.1} MiB/s | link {:.1} MiB/s | expected downtime {:.1} ms{}",
            s.get("phase").and_then(|v| v.as_str()).unwrap_or("?"),
            get("round"),
            get("bytes_sent") / 1048576.0,
            get("dirty_rate_bytes_per_s") / 1048576.0,
            get("bandwidth_bytes_per_s") / 1048576.0,
            get("expected_downtime_ms"),
            match get("throttle_pct") {
                t if t > 0.0 => format!(" | vCPUs throttled {t:.0}%"),
                _ => String::new(),
            },
        ) + &match get("postcopy_pages_left") {
            left if left > 0.0 => format!(" | post-copy: {left:.0} page(s) still here"),
            _ => String::new(),
        });
        bar.tick();
        if s.get("done").and_then(|v| v.as_bool()).unwrap_or(false) {
            break s;
        }
    };
    bar.finish_and_clear();
    for line in final_status.get("plan").and_then(|p| p.as_array()).into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or(""));
    }
    if let Some(err) = final_status.get("error").and_then(|e| e.as_str()) {
        return Err(anyhow!("migration failed, the guest keeps running here: {err}"));
    }
    let transport = final_status.get("transport").and_then(|t| t.as_str()).unwrap_or("");
    if transport.starts_with("PLAINTEXT") {
        eprintln!("ferry: warning: this migration went over {transport}");
    }
    println!("{}", serde_json::to_string_pretty(&final_status).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
