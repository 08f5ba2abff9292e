//! Writing a snapshot of a running VM: paused while it is written, each
//! device at the state version the target host loads.

use std::{fs::File, io::BufWriter, path::Path, time::Instant};

use super::{SnapshotFault, VmError};
use crate::{
    images::ReadChunksError,
    migration::{
        manifest::MANIFEST_VERSION,
        stream::{self, Kind, StreamError},
        vmstate::{VmState, VmStateError},
    },
    state,
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
    /// Write a snapshot to `path` (through a temporary file, renamed when
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
        self.pause()?;
        let result = if self.control.is_stopping() {
            // A reset (or the end) came first: the vCPUs are leaving, not
            // parked, and a reboot may be about to clear RAM.
            Err(VmError::Ending("no snapshot was written"))
        } else {
            self.write_snapshot(path, target)
        };
        let paused_ms = start.elapsed().as_secs_f64() * 1e3;
        if was_running {
            self.resume()?;
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
        let fail =
            |m: String| VmError::Snapshot { path: shown.clone(), fault: SnapshotFault::Unusable, message: m };
        let refused =
            |m: String| VmError::Snapshot { path: shown.clone(), fault: SnapshotFault::Refused, message: m };
        let mut manifest = self.manifest();
        let plan = target.map(|t| crate::migration::plan::make_plan(&manifest, &t.plugins, t.cpu.as_ref()));
        if let Some(p) = plan.as_ref().filter(|p| p.refused()) {
            let lines: Vec<String> = p.lines().into_iter().filter(|l| l.contains("REFUSED")).collect();
            return Err(refused(format!("the target host cannot restore it: {}", lines.join("; "))));
        }
        let state = VmState::capture(self, plan.as_ref()).map_err(|e| match e {
            VmStateError::Device { .. } => refused(e.to_string()),
            e => fail(e.to_string()),
        })?;
        for d in &state.devices {
            if let Some(r) = manifest.devices.iter_mut().find(|r| r.id == d.id) {
                r.state_version = d.version;
            }
        }
        if let Some(t) = target {
            for m in &mut manifest.machine.devices {
                if let Some(p) = t.plugins.iter().find(|p| p.name == m.plugin) {
                    m.properties.retain(|k, _| p.properties.iter().any(|q| q == k));
                }
            }
        }

        let tmp = path.with_extension("partial");
        let file = File::create(&tmp).map_err(|e| VmError::Snapshot {
            path: shown.clone(),
            fault: SnapshotFault::Path,
            message: format!("cannot create {}: {e}", tmp.display()),
        })?;
        let write = || -> Result<u64, VmStateError> {
            let mut w = stream::Writer::new(BufWriter::new(&file))?;
            let encoded = state::encode(&manifest)
                .map_err(|e| VmStateError::Section { section: "manifest".into(), message: e.to_string() })?;
            w.section(Kind::Manifest, "", MANIFEST_VERSION, &encoded)?;
            self.write_images(&mut w)?;
            state.write(&mut w)?;
            let runs = self.ram.nonzero_runs();
            let data: Vec<(u64, &[u8])> =
                runs.iter().filter_map(|&(gpa, len)| self.ram.bytes(gpa, len).map(|b| (gpa, b))).collect();
            w.memory(&data)?;
            let out = w.finish()?.into_inner().map_err(|e| StreamError::Io(e.into_error()))?;
            out.sync_all().map_err(StreamError::Io)?;
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

    /// The guest's boot image as IMAGE sections, so that the restored guest
    /// can reboot on any host. If this host's store lost a file since the
    /// boot, none is written and the log says the restored guest cannot
    /// reboot.
    fn write_images<W: std::io::Write + std::io::Seek>(
        &self,
        w: &mut stream::Writer<W>,
    ) -> Result<(), VmStateError> {
        let Some(image) = self.image.get() else { return Ok(()) };
        if let Some(lost) = image.store.missing(&image.record).first() {
            crate::log::warn(&format!(
                "boot image {} is no longer in the image store {}: the restored guest cannot reboot",
                lost.short(),
                image.store.dir().display()
            ));
            return Ok(());
        }
        for i in image.record.images() {
            image.store.read_chunks(i, |piece| w.section(Kind::Image, &i.sha256, 1, piece)).map_err(|e| {
                match e {
                    ReadChunksError::Store(e) => {
                        VmStateError::Section { section: "boot image".into(), message: e.to_string() }
                    }
                    ReadChunksError::Sink(e) => VmStateError::Stream(e),
                }
            })?;
        }
        Ok(())
    }
}
