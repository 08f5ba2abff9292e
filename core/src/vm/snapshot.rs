//! Writing a snapshot of a running VM: paused while it is written, each
//! device at the state version the target host loads.

use std::{fs::File, io::BufWriter, path::Path, time::Instant};

use super::VmError;
use crate::{
    migration::{
        manifest::MANIFEST_VERSION,
        stream::{self, Kind, StreamError},
    },
    state::{self, StateError, MACHINE_STATE_VERSION, VCPU_STATE_VERSION},
    vmcore::VmCore,
};

/// What a snapshot wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotReport {
    /// The file.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// Guest RAM bytes stored (non-zero pages).
    pub memory_bytes: u64,
    /// Time the guest was paused, in milliseconds.
    pub paused_ms: f64,
}

impl VmCore {
    /// complete). The guest is paused while it is written and resumed after
    /// if it was running.
    pub fn snapshot(&self, path: &Path) -> Result<SnapshotReport, VmError> {
        self.snapshot_for(path, None)
    }

    /// Write a snapshot that the host described by `target` can restore:
    /// each device at the state version the plan gives (downgrades run now,
    /// and refuse if the guest uses what the older version lacks), and the
    /// machine type without the properties the target's plugins do not know.
    pub fn snapshot_for(
        &self,
        path: &Path,
        target: Option<&crate::migration::plan::HostManifest>,
    ) -> Result<SnapshotReport, VmError> {
        let start = Instant::now();
        let was_running = !self.control.is_paused();
        self.pause().map_err(VmError::Runtime)?;
        let result = if self.control.is_stopping() {
            // A reset (or the end) came first: the vCPUs are leaving, not
            // parked, and a reboot may be about to clear RAM.
            Err(VmError::Runtime("the guest is resetting or ending: no snapshot was written".into()))
        } else {
            self.write_snapshot(path, target)
        };
        let paused_ms = start.elapsed().as_secs_f64() * 1e3;
        if was_running {
            self.resume().map_err(VmError::Runtime)?;
        }
        let (bytes, memory_bytes) = result?;
        Ok(SnapshotReport { path: path.display().to_string(), bytes, memory_bytes, paused_ms })
    }

    fn write_snapshot(
        &self,
        path: &Path,
        target: Option<&crate::migration::plan::HostManifest>,
    ) -> Result<(u64, u64), VmError> {
        let shown = path.display().to_string();
        let fail = |m: String| VmError::Snapshot { path: shown.clone(), message: m };
        let refused = |m: String| VmError::SnapshotRefused { path: shown.clone(), message: m };
        let mut manifest = self.manifest();
        let plan = target.map(|t| crate::migration::plan::make_plan(&manifest, &t.plugins, t.cpu.as_ref()));
        if let Some(p) = plan.as_ref().filter(|p| p.refused()) {
            let lines: Vec<String> = p.lines().into_iter().filter(|l| l.contains("REFUSED")).collect();
            return Err(refused(format!("the target host cannot restore it: {}", lines.join("; "))));
        }
        let mut devices = Vec::new();
        for d in self.bus.devices() {
            let lib =
                self.registry.get(&d.plugin).ok_or_else(|| fail(format!("plugin {} vanished", d.plugin)))?;
            let version = match &plan {
                Some(p) => p.write_version(&d.id).unwrap_or(lib.descriptor.state.current),
                None => lib.descriptor.state.current,
            };
            let blob = d
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(version)
                .into_result()
                .map_err(|e| refused(format!("device {} ({}): {e}", d.id, d.plugin)))?;
            if let Some(r) = manifest.devices.iter_mut().find(|r| r.id == d.id) {
                r.state_version = blob.version;
            }
            devices.push((d.id.clone(), blob));
        }
        if let Some(t) = target {
            for m in &mut manifest.machine.devices {
                if let Some(p) = t.plugins.iter().find(|p| p.name == m.plugin) {
                    m.properties.retain(|k, _| p.properties.iter().any(|q| q == k));
                }
            }
        }
        let vcpus = self.control.take_vcpu_states();
        let machine = state::save_machine(&self.kvm.vm)?;

        let tmp = path.with_extension("partial");
        let file = File::create(&tmp).map_err(|e| VmError::SnapshotPath {
            path: shown.clone(),
            message: format!("cannot create {}: {e}", tmp.display()),
        })?;
        let write = || -> Result<u64, StreamError> {
            let mut w = stream::Writer::new(BufWriter::new(&file))?;
            let enc = |v: Result<Vec<u8>, StateError>| v.map_err(|e| std::io::Error::other(e.to_string()));
            w.section(Kind::Manifest, "", MANIFEST_VERSION, &enc(state::encode(&manifest))?)?;
            w.section(Kind::Machine, "", MACHINE_STATE_VERSION, &enc(state::encode(&machine))?)?;
            for (i, s) in vcpus.iter().enumerate() {
                let s = s.as_ref().map_err(|e| std::io::Error::other(format!("vCPU {i}: {e}")))?;
                w.section(Kind::Vcpu, &format!("cpu{i}"), VCPU_STATE_VERSION, &enc(state::encode(s))?)?;
            }
            for (id, blob) in &devices {
                w.section(Kind::Device, id, blob.version, blob.bytes.as_slice())?;
            }
            let runs = self.ram.nonzero_runs();
            let data: Vec<(u64, &[u8])> =
                runs.iter().filter_map(|&(gpa, len)| self.ram.bytes(gpa, len).map(|b| (gpa, b))).collect();
            w.memory(&data)?;
            w.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(runs.iter().map(|r| r.1).sum())
        };
        let memory_bytes = write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e.to_string())
        })?;
        std::fs::rename(&tmp, path).map_err(|e| fail(format!("cannot rename into place: {e}")))?;
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok((bytes, memory_bytes))
    }
}
