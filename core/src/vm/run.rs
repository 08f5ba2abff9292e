//! Running a built VM: the vCPU threads, the control API, migrations
//! started through it, and the wait for the guest to end (or reset: then
//! the guest reboots in place, `reset.rs`, and runs again).

use std::sync::Arc;

use super::{OnReset, Outcome, Vm, VmError};
use crate::{
    api::{self, ApiRequest, Failure},
    vcpu::{self, StopEvent},
};

impl Vm {
    /// Start the vCPUs and run until the guest ends, answering the control
    /// API's requests from `served` (bound before the VM was built, so a
    /// socket in use is refused before anything starts). For an incoming
    /// migration, `confirm` tells the source the guest runs here now,
    /// before the vCPUs start.
    pub fn run(
        mut self,
        served: Option<api::Served>,
        confirm: Option<crate::migration::destination::IncomingLink>,
    ) -> Result<Outcome, VmError> {
        vcpu::install_kick_handler().map_err(VmError::Runtime)?;
        if let Some(mut link) = confirm {
            link.resumed().map_err(|e| {
                VmError::Failed(format!(
                    "incoming migration: cannot confirm to the source ({e}); the guest stays there"
                ))
            })?;
        }
        if !self.cpu.kvm_rewrote.is_empty() {
            crate::log::warn(&format!(
                "cpu {}: this host's KVM changed the CPUID ferry set ({} register(s), listed by `ferry ctl info`): \
                 the guest may see features beyond its model, which moves are not checked against",
                self.cpu.model,
                self.cpu.kvm_rewrote.len()
            ));
        }
        let never = crossbeam_channel::never();
        let api = served.as_ref().map(|s| &s.calls).unwrap_or(&never);
        let mut shutdown = false;
        let mut shutdown_answer = false;
        let mut migrated = None;
        let (mig_tx, mig_rx) = crossbeam_channel::unbounded();
        let cancel = Arc::new(crate::migration::conn::Cancel::default());
        let mut migrating = false;
        // After a completed migration the (paused) source lingers until the
        // report was fetched through the API, or a short while.
        let mut linger = crossbeam_channel::never();
        // One pass per boot: a reset that reboots starts the next.
        let event = 'boots: loop {
            let vcpus = std::mem::take(&mut self.vcpus);
            let handles = vcpu::spawn(
                vcpus,
                self.bus.clone(),
                self.control.clone(),
                std::sync::Arc::new(self.cpu.msrs.clone()),
            )
            .map_err(VmError::Runtime)?;
            crate::log::info(&format!(
                "vCPUs started {:.1} ms after ferry started",
                crate::log::since_start_ms()
            ));
            // A reset that came while a migration ran: it waits until the
            // migration, cancelled, has given up.
            let mut reset_pending = None;
            let event = loop {
                crossbeam_channel::select! {
                    recv(self.stop_rx) -> ev => {
                        let ev = ev.unwrap_or(StopEvent::Error("VM control channel closed".into()));
                        if matches!(ev, StopEvent::DeviceFailed { .. }) && migrating {
                            cancel.cancel();
                        }
                        if ev == StopEvent::Reset && migrating {
                            crate::log::warn("the guest reset the machine during a migration: cancelling the migration");
                            cancel.cancel();
                            reset_pending = Some(ev);
                            continue;
                        }
                        break ev;
                    }
                    recv(linger) -> _ => self.control.stop(StopEvent::Exit(0)),
                    recv(mig_rx) -> done => {
                        migrating = false;
                        let done: Result<crate::migration::status::Status, String> =
                            done.unwrap_or_else(|_| Err("migration thread ended".into()));
                        let mut status = self.migration.lock().unwrap_or_else(|e| e.into_inner());
                        match done {
                            Ok(s) if s.phase == crate::migration::status::Phase::Completed => {
                                *status = Some(s.clone());
                                migrated = Some(s);
                                linger = crossbeam_channel::after(std::time::Duration::from_secs(2));
                            }
                            Ok(s) => *status = Some(s),
                            Err(e) => {
                                let e = if reset_pending.is_some() {
                                    format!("the guest reset the machine during the migration ({e})")
                                } else {
                                    e
                                };
                                crate::log::warn(&format!("migration failed, the guest keeps running here: {e}"));
                                let s = status.get_or_insert_with(Default::default);
                                s.phase = crate::migration::status::Phase::Failed;
                                s.error = Some(e);
                                s.done = true;
                            }
                        }
                        if let Some(ev) = reset_pending.take() {
                            break ev;
                        }
                    }
                    recv(api) -> req => {
                        let Ok((req, reply)) = req else { continue };
                        let req_kind = if req == ApiRequest::MigrationStatus { ReqKind::Status } else { ReqKind::Other };
                        let answer = match req {
                            ApiRequest::Pause | ApiRequest::Resume | ApiRequest::Snapshot(..) if migrating => {
                                Err(Failure::conflict("a migration is running"))
                            }
                            ApiRequest::Info => Ok(self.info()),
                            ApiRequest::Pause => self.pause().map(|()| self.info()).map_err(Failure::failed),
                            ApiRequest::Resume => self.resume().map(|()| self.info()).map_err(Failure::failed),
                            ApiRequest::Snapshot(path, target) => self
                                .snapshot_for(&path, target.as_deref())
                                .map(|r| serde_json::to_value(r).unwrap_or_default())
                                .map_err(|e| snapshot_failure(&e)),
                            ApiRequest::MigrationStatus => Ok(serde_json::to_value(
                                self.migration.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                            )
                            .unwrap_or_default()),
                            ApiRequest::MigrateCancel if migrating => {
                                cancel.cancel();
                                Ok(serde_json::json!({"state": "cancelling"}))
                            }
                            ApiRequest::MigrateCancel => Err(Failure::conflict("no migration is running")),
                            ApiRequest::Migrate { .. } if migrating => Err(Failure::conflict("a migration is already running")),
                            ApiRequest::Migrate { uri, max_downtime_ms, dry_run, security } => {
                                migrating = true;
                                cancel.clear();
                                *self.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(crate::migration::status::Status {
                                    phase: crate::migration::status::Phase::Handshake,
                                    ..Default::default()
                                });
                                let core = self.core.clone();
                                let (tx, cancel) = (mig_tx.clone(), cancel.clone());
                                let opts = crate::migration::source::Options { uri, max_downtime_ms, dry_run, security };
                                std::thread::Builder::new()
                                    .name("migration".into())
                                    .spawn(move || {
                                        let r = crate::migration::source::migrate(&core, &opts, &cancel).map_err(|e| e.to_string());
                                        let _ = tx.send(r);
                                    })
                                    .map(|_| serde_json::json!({"state": "started"}))
                                    .map_err(|e| Failure::failed(e.to_string()))
                            }
                            ApiRequest::Shutdown => {
                                shutdown = true;
                                shutdown_answer = true;
                                // Earlier answers' signals; the next one is this answer's.
                                if let Some(s) = &served {
                                    while s.answered.try_recv().is_ok() {}
                                }
                                self.control.stop(StopEvent::Exit(0));
                                Ok(serde_json::json!({"state": "shutting down"}))
                            }
                        };
                        let reported = migrated.is_some() && matches!(req_kind, ReqKind::Status);
                        if reported {
                            // The last answer before ferry exits: wait for it below.
                            shutdown_answer = true;
                            if let Some(s) = &served {
                                while s.answered.try_recv().is_ok() {}
                            }
                        }
                        let _ = reply.send(answer);
                        if reported {
                            self.control.stop(StopEvent::Exit(0));
                        }
                    }
                }
            };
            self.vcpus = vcpu::join(handles, &self.control);
            let _ = self.set_devices_paused(true);
            if event == StopEvent::Reset
                && migrated.is_none()
                && !shutdown
                && self.on_reset == OnReset::Reboot
            {
                match self.can_reboot() {
                    Ok(()) => {
                        self.reboot()?;
                        continue 'boots;
                    }
                    Err(why) => crate::log::warn(&format!(
                        "the guest reset the machine; ending, as it cannot reboot: {why}"
                    )),
                }
            }
            break 'boots event;
        };
        if let StopEvent::DeviceFailed { index, message } = &event {
            *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((*index, message.clone()));
            // Without an API ferry ends now, with the failure as its error
            // line; with one it says so now and again when it ends.
            if let Some(s) = &served {
                crate::log::log(
                    ferry_plugin_api::LogLevel::ERROR,
                    &format!(
                        "{message}; the guest is stopped, the API answers, `ferry ctl shutdown` ends ferry"
                    ),
                );
                self.serve_failed(s, message);
                shutdown_answer = true;
            }
        }
        if shutdown_answer {
            // Let the API thread finish writing the last answer.
            if let Some(s) = &served {
                let _ = s.answered.recv_timeout(std::time::Duration::from_secs(2));
            }
        }
        drop(served); // removes the socket
        if let Some(status) = migrated {
            return Ok(Outcome::Migrated(status));
        }
        match event {
            StopEvent::Exit(_) if shutdown => Ok(Outcome::Shutdown),
            StopEvent::Reset => Ok(Outcome::Reset),
            StopEvent::Exit(status) => Ok(Outcome::Exit(status)),
            StopEvent::Error(msg) | StopEvent::DeviceFailed { message: msg, .. } => Err(VmError::Failed(msg)),
        }
    }

    /// After an isolated device failed: the guest stays stopped, nothing
    /// of it is written anywhere, and the API answers (`info` names the
    /// failed device) until `shutdown`.
    fn serve_failed(&self, served: &api::Served, message: &str) {
        while let Ok((req, reply)) = served.calls.recv() {
            let answer = match req {
                ApiRequest::Info => Ok(self.info()),
                ApiRequest::MigrationStatus => {
                    Ok(serde_json::to_value(self.migration.lock().unwrap_or_else(|e| e.into_inner()).clone())
                        .unwrap_or_default())
                }
                ApiRequest::Shutdown => {
                    while served.answered.try_recv().is_ok() {}
                    let _ = reply.send(Ok(serde_json::json!({"state": "shutting down"})));
                    return;
                }
                _ => Err(Failure::conflict(format!("the guest is stopped for good: {message}"))),
            };
            let _ = reply.send(answer);
        }
    }
}

/// The API's answer to a failed snapshot: 409 when the guest's state or
/// the target host refuses it, 400 when the path cannot be created, 500
/// otherwise.
fn snapshot_failure(e: &VmError) -> Failure {
    let status = match e {
        VmError::SnapshotRefused { .. } => 409,
        VmError::SnapshotPath { .. } => 400,
        _ => 500,
    };
    Failure { status, message: e.to_string() }
}

/// Which kind of API request was just answered (for the post-migration linger).
enum ReqKind {
    Status,
    Other,
}
