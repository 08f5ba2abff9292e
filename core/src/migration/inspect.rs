//! `ferry inspect`: a snapshot's manifest and sections, every CRC checked
//! (memory included), as text or JSON. Reading stops at the first damage,
//! which the report names.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use serde::Serialize;

use super::{
    manifest::Manifest,
    stream::{Kind, Reader},
};

/// One section as found.
#[derive(Debug, Clone, Serialize)]
pub struct SectionInfo {
    /// Number in the stream.
    pub index: usize,
    /// Kind name.
    pub kind: &'static str,
    /// Id.
    pub id: String,
    /// Payload version.
    pub version: u32,
    /// Payload offset.
    pub offset: u64,
    /// Payload length.
    pub length: u64,
    /// CRC checked and good.
    pub crc_ok: bool,
}

/// Memory as found.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryInfo {
    /// Runs of non-zero pages.
    pub runs: usize,
    /// Bytes stored.
    pub bytes: u64,
    /// Every run's CRC good.
    pub crc_ok: bool,
}

/// One MSR the vCPU sections hold.
#[derive(Debug, Clone, Serialize)]
pub struct MsrInfo {
    /// Index.
    pub index: u32,
    /// Name ("" if ferry does not know it).
    pub name: String,
    /// In ferry's catalogue (what ferry saves today)?
    pub catalogued: bool,
}

/// The guest's CPU, by name.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// Model.
    pub model: String,
    /// Vendor.
    pub vendor: String,
    /// Brand string of its CPUID.
    pub brand: String,
    /// TSC frequency, if recorded.
    pub tsc_khz: Option<u32>,
    /// Written before ferry recorded CPU models.
    pub legacy: bool,
    /// The MSRs each vCPU saved.
    pub msrs: Vec<MsrInfo>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// File.
    pub file: String,
    /// File length.
    pub length: u64,
    /// The manifest, if it decoded.
    pub manifest: Option<Manifest>,
    /// The guest's CPU, once the manifest (and, for old files, vCPU 0's
    /// section) decoded.
    pub cpu: Option<CpuInfo>,
    /// Sections read.
    pub sections: Vec<SectionInfo>,
    /// Memory.
    pub memory: Option<MemoryInfo>,
    /// Where reading stopped, if it did.
    pub error: Option<String>,
}

impl Report {
    /// Nothing wrong.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// As text for people.
    pub fn to_text(&self) -> String {
        let mut t = format!("snapshot {} ({} bytes)\n", self.file, self.length);
        if let Some(m) = &self.manifest {
            t += &format!(
                "written by ferry {}; machine type {}; {} vCPU(s); {} of RAM in {} range(s); {} CPUID entries\n",
                m.ferry_version,
                m.machine.name,
                m.cpus,
                crate::memory::human_size(m.memory),
                m.ram.len(),
                m.cpuid.len()
            );
            if let Some(c) = &self.cpu {
                let tsc =
                    c.tsc_khz.map(|k| format!("TSC {k} kHz")).unwrap_or_else(|| "TSC not recorded".into());
                let brand = if c.brand.is_empty() { String::new() } else { format!(", \"{}\"", c.brand) };
                t += &format!("cpu: {} on {}, {tsc}{brand}\n", c.model, c.vendor);
                if c.legacy {
                    t += "  written before CPU models: restored with the restoring host's CPUID\n";
                }
                let names: Vec<String> = c
                    .msrs
                    .iter()
                    .map(|m| {
                        let label = crate::cpu::msrs::label(m.index);
                        if m.catalogued {
                            label
                        } else {
                            format!("{label} (not in the catalogue)")
                        }
                    })
                    .collect();
                t += &format!("msrs ({}): {}\n", c.msrs.len(), names.join(", "));
            }
            t += "devices:\n";
            for d in &m.devices {
                t += &format!(
                    "  {:<12} {:<14} {:<8} state v{}\n",
                    d.id, d.plugin, d.plugin_version, d.state_version
                );
            }
        }
        t += "sections:\n";
        for s in &self.sections {
            t += &format!(
                "  {:>3} {:<8} {:<12} v{:<3} offset {:>10} length {:>10} crc {}\n",
                s.index,
                s.kind,
                s.id,
                s.version,
                s.offset,
                s.length,
                if s.crc_ok { "ok" } else { "BAD" }
            );
        }
        if let Some(mem) = &self.memory {
            t += &format!(
                "memory: {} run(s), {} stored, crc {}\n",
                mem.runs,
                crate::memory::human_size(mem.bytes),
                if mem.crc_ok { "ok" } else { "BAD" }
            );
        }
        match &self.error {
            Some(e) => t += &format!("ERROR: {e}\n"),
            None => t += "ok\n",
        }
        t
    }
}

fn msr_info(index: u32) -> MsrInfo {
    MsrInfo {
        index,
        name: crate::cpu::msrs::name(index).unwrap_or_default().to_string(),
        catalogued: crate::cpu::msrs::is_catalogued(index),
    }
}

/// A snapshot file that cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {path}: {source}")]
pub struct OpenError {
    /// The file.
    pub path: String,
    /// Why.
    pub source: std::io::Error,
}

/// Read and check a snapshot file.
pub fn inspect(path: &Path) -> Result<Report, OpenError> {
    let file = File::open(path).map_err(|source| OpenError { path: path.display().to_string(), source })?;
    Ok(inspect_reader(&path.display().to_string(), file))
}

/// Read and check a stream from any seekable input (the fuzz target's
/// entry point: every input must end in a report, never a panic).
pub fn inspect_reader<R: Read + Seek>(name: &str, mut input: R) -> Report {
    let length = input.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = input.seek(SeekFrom::Start(0));
    let mut report = Report {
        file: name.to_string(),
        length,
        manifest: None,
        cpu: None,
        sections: Vec::new(),
        memory: None,
        error: None,
    };
    let mut r = match Reader::new(input) {
        Ok(r) => r,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    loop {
        let h = match r.next_header() {
            Ok(h) => h,
            Err(e) => {
                report.error = Some(e.to_string());
                break;
            }
        };
        let mut info = SectionInfo {
            index: h.index,
            kind: h.kind.name(),
            id: h.id.clone(),
            version: h.version,
            offset: h.payload_at,
            length: h.payload_len,
            crc_ok: false,
        };
        if h.kind == Kind::End {
            info.crc_ok = true;
            report.sections.push(info);
            break;
        }
        let payload = match r.payload(&h) {
            Ok(p) => p,
            Err(e) => {
                report.sections.push(info);
                report.error = Some(e.to_string());
                break;
            }
        };
        info.crc_ok = true;
        report.sections.push(info);
        match h.kind {
            Kind::Manifest => match crate::state::decode::<Manifest>(&payload) {
                Ok(m) => {
                    report.cpu = m.cpu.as_ref().map(|c| CpuInfo {
                        model: c.model.clone(),
                        vendor: c.vendor.clone(),
                        brand: crate::cpu::cpuid::brand(&m.cpuid),
                        tsc_khz: c.tsc_khz,
                        legacy: false,
                        msrs: c.msrs.iter().map(|x| msr_info(x.index)).collect(),
                    });
                    report.manifest = Some(m);
                }
                Err(e) => {
                    report.error = Some(format!("section {} (manifest): {e}", h.index));
                    break;
                }
            },
            Kind::Vcpu if h.id == "cpu0" && report.cpu.is_none() => {
                // A manifest from before CPU models: vCPU 0 lists the MSRs.
                let Some(m) = &report.manifest else { continue };
                match super::vmstate::load_section::<crate::state::VcpuStateV2>(
                    "vcpu cpu0",
                    h.version,
                    &payload,
                ) {
                    Ok(v) => {
                        report.cpu = Some(CpuInfo {
                            model: "host".into(),
                            vendor: crate::cpu::cpuid::vendor(&m.cpuid),
                            brand: crate::cpu::cpuid::brand(&m.cpuid),
                            tsc_khz: None,
                            legacy: true,
                            msrs: v.msrs().iter().map(|x| msr_info(x.index)).collect(),
                        })
                    }
                    Err(e) => {
                        report.error = Some(format!("section {}: {e}", h.index));
                        break;
                    }
                }
            }
            Kind::Memory => {
                let ram = report.manifest.as_ref().map(|m| m.ram.clone()).unwrap_or_default();
                let runs = match r.runs(&h, &payload, &ram) {
                    Ok(runs) => runs,
                    Err(e) => {
                        report.error = Some(e.to_string());
                        break;
                    }
                };
                let mut mem = MemoryInfo {
                    runs: runs.len(),
                    bytes: runs.iter().map(|x| x.pages * 4096).sum(),
                    crc_ok: true,
                };
                for (i, run) in runs.iter().enumerate() {
                    if let Err(e) = r.verify_run(&h, i, run) {
                        mem.crc_ok = false;
                        report.error = Some(e.to_string());
                        break;
                    }
                }
                report.memory = Some(mem);
                if report.error.is_some() {
                    break;
                }
                if let Err(e) = r.skip_memory(&h, &runs) {
                    report.error = Some(e.to_string());
                    break;
                }
            }
            _ => {}
        }
    }
    if report.error.is_none() && report.sections.last().map(|s| s.kind) != Some("end") {
        report.error = Some("no end marker".into());
    }
    report
}
