//! The controller of a running VM: what the main loop (`run.rs`) hands
//! each event to. It answers the control API's requests, starts and
//! supervises live migrations, and decides what a stop event means while
//! a migration runs. Its state is what the main loop used to keep in
//! loose flags: whether a shutdown was asked for, whether a migration runs
//! or completed, a reset waiting for a cancelled migration to give up.

use std::{sync::Arc, time::Duration};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

use super::Vm;
use crate::{
    api::{ApiError, ApiRequest},
    migration::{
        conn::{Cancel, MigrateError},
        source,
        status::{Phase, Status},
    },
    vcpu::StopEvent,
};

/// How long a completed migration's source lingers for its report to be
/// fetched through the API.
const LINGER: Duration = Duration::from_secs(2);

/// What a migration thread reports when it ends.
type Outcome = Result<Status, MigrateError>;

/// The controller's state for one run of a VM.
pub(super) struct Controller {
    /// `ferry ctl shutdown` was asked.
    pub shutdown: bool,
    /// An answer is the last before ferry exits: wait until it is written.
    pub last_answer: bool,
    /// The migration completed: the guest runs elsewhere.
    pub migrated: Option<Status>,
    migrating: bool,
    cancel: Arc<Cancel>,
    done_tx: Sender<Outcome>,
    /// Migration threads' outcomes.
    pub done_rx: Receiver<Outcome>,
    /// Fires once a completed migration's source has lingered long enough.
    pub linger: Receiver<std::time::Instant>,
    /// A reset that came during a migration, held until it gives up.
    reset_pending: Option<StopEvent>,
    /// Where a paused post-copy reconnects (`migrate --resume`).
    resume_tx: Sender<source::Options>,
    resume_rx: Receiver<source::Options>,
}

impl Controller {
    pub(super) fn new() -> Self {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (resume_tx, resume_rx) = crossbeam_channel::unbounded();
        Controller {
            resume_tx,
            resume_rx,
            shutdown: false,
            last_answer: false,
            migrated: None,
            migrating: false,
            cancel: Arc::new(Cancel::default()),
            done_tx,
            done_rx,
            linger: crossbeam_channel::never(),
            reset_pending: None,
        }
    }

    /// A stop event arrived. Returns the event that ends this boot, or
    /// None to keep running (a reset waits for a migration to give up).
    pub(super) fn on_stop(&mut self, event: StopEvent) -> Option<StopEvent> {
        if matches!(event, StopEvent::DeviceFailed { .. }) && self.migrating {
            self.cancel.cancel();
        }
        if event == StopEvent::Reset && self.migrating {
            crate::log::warn("the guest reset the machine during a migration: cancelling the migration");
            self.cancel.cancel();
            self.reset_pending = Some(event);
            return None;
        }
        Some(event)
    }

    /// A migration thread ended. Returns the event that ends this boot (a
    /// reset that waited for it), if any.
    pub(super) fn on_migration_done(&mut self, vm: &Vm, done: Option<Outcome>) -> Option<StopEvent> {
        self.migrating = false;
        let done = done.unwrap_or_else(|| Err(MigrateError::Protocol("migration thread ended".into())));
        let mut status = vm.migration.lock().unwrap_or_else(|e| e.into_inner());
        match done {
            Ok(s) if s.phase == Phase::Completed => {
                *status = Some(s.clone());
                self.migrated = Some(s);
                self.linger = crossbeam_channel::after(LINGER);
            }
            Ok(s) => *status = Some(s),
            Err(e @ MigrateError::GuestMoved(_)) => {
                crate::log::log(ferry_plugin_api::LogLevel::ERROR, &format!("migration failed: {e}"));
                let s = status.get_or_insert_with(Default::default);
                s.phase = Phase::Failed;
                s.error = Some(e.to_string());
                s.done = true;
            }
            Err(e) => {
                let e = match self.reset_pending {
                    Some(_) => format!("the guest reset the machine during the migration ({e})"),
                    None => e.to_string(),
                };
                crate::log::warn(&format!("migration failed, the guest keeps running here: {e}"));
                let s = status.get_or_insert_with(Default::default);
                s.phase = Phase::Failed;
                s.error = Some(e);
                s.done = true;
            }
        }
        self.reset_pending.take()
    }

    /// Answer one API request.
    pub(super) fn on_request(&mut self, vm: &Vm, req: ApiRequest) -> Result<Value, ApiError> {
        let busy = |what: &str| Err(ApiError::Conflict(what.to_string()));
        match req {
            ApiRequest::Pause | ApiRequest::Resume | ApiRequest::Snapshot(_) if self.migrating => {
                busy("a migration is running")
            }
            ApiRequest::Info => Ok(vm.info()),
            ApiRequest::Pause => vm.pause().map(|()| vm.info()).map_err(|e| ApiError::Failed(e.to_string())),
            ApiRequest::Resume => {
                vm.resume().map(|()| vm.info()).map_err(|e| ApiError::Failed(e.to_string()))
            }
            ApiRequest::Snapshot(s) => vm
                .snapshot_for(&s.path, s.target.as_deref())
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_api()),
            ApiRequest::MigrationStatus => Ok(migration_status(vm)),
            ApiRequest::Migrate(m) if m.resume => {
                let paused = vm.migration.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| s.phase)
                    == Some(Phase::PostcopyPaused);
                if !(self.migrating && paused) {
                    return busy("no post-copy waits to be resumed");
                }
                while self.resume_rx.try_recv().is_ok() {}
                let _ = self.resume_tx.send(m.options()?);
                Ok(serde_json::json!({"state": "resuming"}))
            }
            ApiRequest::MigrateCancel if self.migrating && self.guest_moved(vm) => {
                busy("post-copy: the guest runs on the destination; the migration can only finish (migrate --resume)")
            }
            ApiRequest::MigrateCancel if self.migrating => {
                self.cancel.cancel();
                Ok(serde_json::json!({"state": "cancelling"}))
            }
            ApiRequest::MigrateCancel => busy("no migration is running"),
            ApiRequest::Migrate(_) if self.migrating => busy("a migration is already running"),
            ApiRequest::Migrate(m) => self.start_migration(vm, m.options()?),
            ApiRequest::Shutdown => {
                self.shutdown = true;
                self.last_answer = true;
                vm.control.stop(StopEvent::Exit(0));
                Ok(serde_json::json!({"state": "shutting down"}))
            }
        }
    }

    /// Has a post-copy moved the guest (it runs on the destination)?
    fn guest_moved(&self, vm: &Vm) -> bool {
        let status = vm.migration.lock().unwrap_or_else(|e| e.into_inner());
        matches!(status.as_ref().map(|s| s.phase), Some(Phase::Postcopy | Phase::PostcopyPaused))
    }

    /// Is this answer the last before ferry ends? (A migrated source ends
    /// once its report was fetched.)
    pub(super) fn ends_after(&self, req: &ApiRequest) -> bool {
        *req == ApiRequest::Shutdown || (self.migrated.is_some() && *req == ApiRequest::MigrationStatus)
    }

    fn start_migration(&mut self, vm: &Vm, opts: source::Options) -> Result<Value, ApiError> {
        self.migrating = true;
        self.cancel.clear();
        *vm.migration.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Status { phase: Phase::Handshake, ..Default::default() });
        let core = vm.core.clone();
        let (tx, cancel, resume) = (self.done_tx.clone(), self.cancel.clone(), self.resume_rx.clone());
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let filtered =
                    crate::seccomp::lists::migration().and_then(|r| crate::seccomp::install(r, false));
                let result = match filtered {
                    Ok(()) => source::migrate(&core, &opts, &cancel, &resume),
                    Err(e) => Err(MigrateError::Protocol(e.to_string())),
                };
                let _ = tx.send(result);
            })
            .map(|_| serde_json::json!({"state": "started"}))
            .map_err(|e| {
                self.migrating = false;
                ApiError::Failed(format!("cannot start the migration thread: {e}"))
            })
    }
}

/// The migration in progress or last finished, as the API shows it.
pub(super) fn migration_status(vm: &Vm) -> Value {
    serde_json::to_value(vm.migration.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default()
}
