//! Running a built VM: the main loop starts the vCPU threads and hands
//! every event (a stop, a migration's end, an API request) to the
//! controller (`control.rs`) until the guest ends (or resets: then the
//! guest reboots in place, `reset.rs`, and runs again).

use std::sync::Arc;

use super::{control::Controller, OnReset, Outcome, Vm, VmError};
use crate::{
    api::{self, ApiError, ApiRequest},
    migration::destination::IncomingLink,
    vcpu::{self, StopEvent},
};

impl Vm {
    /// Start the vCPUs and run until the guest ends, answering the control
    /// API's requests from `served` (bound before the VM was built, so a
    /// socket in use is refused before anything starts). For an incoming
    /// migration, `confirm` tells the source the guest runs here now,
    /// before the vCPUs start. Each event goes to the [`Controller`].
    pub fn run(
        mut self,
        served: Option<api::Served>,
        confirm: Option<IncomingLink>,
    ) -> Result<Outcome, VmError> {
        vcpu::install_kick_handler()?;
        // Kept to the end: a post-copy may still be pulling when the guest ends.
        let mut incoming = confirm;
        if let Some(link) = &mut incoming {
            link.resumed().map_err(|e| {
                VmError::Stopped(format!(
                    "incoming migration: cannot confirm to the source ({e}); the guest stays there"
                ))
            })?;
            crate::log::step("RESUMED sent");
        }
        if !self.cpu.kvm_rewrote.is_empty() {
            crate::log::warn(&format!(
                "cpu {}: this host's KVM changed the CPUID ferry set ({} register(s), listed by `ferry ctl info`): \
                 the guest may see features beyond its model, which moves are not checked against",
                self.cpu.model,
                self.cpu.kvm_rewrote.len()
            ));
        }
        // Everything is built: from here every thread runs under ferry's
        // process allowlist (vCPU and migration threads add their own).
        crate::seccomp::install(crate::seccomp::lists::process(self.placement.any())?, true)?;
        let never = crossbeam_channel::never();
        let api = served.as_ref().map(|s| &s.calls).unwrap_or(&never);
        let mut ctl = Controller::new();
        // One pass per boot: a reset that reboots starts the next.
        let event = 'boots: loop {
            let vcpus = std::mem::take(&mut self.vcpus);
            let handles =
                vcpu::spawn(vcpus, self.bus.clone(), self.control.clone(), Arc::new(self.cpu.msrs.clone()))?;
            crate::log::info(&format!(
                "vCPUs started {:.1} ms after ferry started",
                crate::log::since_start_ms()
            ));
            if let Some(link) = &mut incoming {
                link.release_buffer();
            }
            let event = loop {
                let ends = crossbeam_channel::select! {
                    recv(self.stop_rx) -> ev => {
                        ctl.on_stop(ev.unwrap_or(StopEvent::Error("VM control channel closed".into())))
                    }
                    recv(ctl.linger) -> _ => {
                        self.control.stop(StopEvent::Exit(0));
                        None
                    }
                    recv(ctl.done_rx) -> done => ctl.on_migration_done(&self, done.ok()),
                    recv(api) -> call => {
                        let Ok((req, reply)) = call else { continue };
                        let last = ctl.ends_after(&req);
                        if last {
                            // The last answer before ferry exits: the signals
                            // of earlier answers go, the next is this one's.
                            ctl.last_answer = true;
                            if let Some(s) = &served {
                                while s.answered.try_recv().is_ok() {}
                            }
                        }
                        let _ = reply.send(ctl.on_request(&self, req));
                        if last && ctl.migrated.is_some() {
                            self.control.stop(StopEvent::Exit(0));
                        }
                        None
                    }
                };
                if let Some(event) = ends {
                    break event;
                }
            };
            self.vcpus = vcpu::join(handles, &self.control);
            let _ = self.set_devices_paused(true);
            if event == StopEvent::Reset
                && ctl.migrated.is_none()
                && !ctl.shutdown
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
        if let Some(link) = &incoming {
            link.guest_ended();
        }
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
                ctl.last_answer = true;
            }
        }
        if ctl.last_answer {
            // Let the API thread finish writing the last answer.
            if let Some(s) = &served {
                let _ = s.answered.recv_timeout(std::time::Duration::from_secs(2));
            }
        }
        drop(served); // removes the socket
        if let Some(status) = ctl.migrated {
            return Ok(Outcome::Migrated(Box::new(status)));
        }
        match event {
            StopEvent::Exit(_) if ctl.shutdown => Ok(Outcome::Shutdown),
            StopEvent::Reset => Ok(Outcome::Reset),
            StopEvent::Exit(status) => Ok(Outcome::Exit(status)),
            StopEvent::Error(msg) | StopEvent::DeviceFailed { message: msg, .. } => {
                Err(VmError::Stopped(msg))
            }
        }
    }

    /// After an isolated device failed: the guest stays stopped, nothing
    /// of it is written anywhere, and the API answers (`info` names the
    /// failed device) until `shutdown`.
    fn serve_failed(&self, served: &api::Served, message: &str) {
        while let Ok((req, reply)) = served.calls.recv() {
            let answer = match req {
                ApiRequest::Info => Ok(self.info()),
                ApiRequest::MigrationStatus => Ok(super::control::migration_status(self)),
                ApiRequest::Shutdown => {
                    while served.answered.try_recv().is_ok() {}
                    let _ = reply.send(Ok(serde_json::json!({"state": "shutting down"})));
                    return;
                }
                _ => Err(ApiError::Conflict(format!("the guest is stopped for good: {message}"))),
            };
            let _ = reply.send(answer);
        }
    }
}
