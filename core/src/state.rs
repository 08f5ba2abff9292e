//! The core's own state, versioned like device state: every vCPU (general
//! and special registers, XSAVE, XCRs, local APIC, MSRs including the TSC,
//! pending events, MP state, debug registers) and the machine (8259 pair,
//! I/O APIC, PIT, kvmclock). Encoded as CBOR; the KVM structures keep
//! their kernel layout (kvm-bindings' serde support).
//!
//! vCPU state versions:
//!
//! | version | MSRs |
//! |---|---|
//! | v1 | every MSR in the *source host's* KVM_GET_MSR_INDEX_LIST, as bare `kvm_msr_entry`s |
//! | v2 | the catalogue entries the guest's CPUID enables (`cpu::msrs`), each with its name |
//!
//! v1 sections (every snapshot written before CPU models) load through an
//! upgrade that keeps every MSR they hold and names those it knows; ferry
//! writes v2. Both types implement plugin-api's [`Versioned`], the trait
//! every device's state implements, so their versions are declared and
//! checked as a plugin's are (`migration/vmstate.rs` reads them).

use ferry_plugin_api::state::Versioned;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors saving or restoring KVM state.
#[derive(Debug, Clone, Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which part.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Encoding or decoding.
    #[error("{0}")]
    Codec(String),
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// One vCPU, as sections written before CPU models hold it.
#[derive(Serialize, Deserialize)]
pub struct VcpuStateV1 {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

/// One MSR's value, by index and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// Index.
    pub index: u32,
    /// Name (from the catalogue; empty for one ferry does not know).
    pub name: String,
    /// Value.
    pub value: u64,
}

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuStateV2 {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<MsrValue>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

impl VcpuStateV2 {
    /// Instruction pointer (for messages and tests).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// The MSRs it holds.
    pub fn msrs(&self) -> &[MsrValue] {
        &self.msrs
    }
}

impl From<VcpuStateV1> for VcpuStateV2 {
    /// Every MSR is kept (the source saved it, the guest may rely on it),
    /// named where the catalogue knows it, in restore order.
    fn from(v1: VcpuStateV1) -> Self {
        let mut msrs: Vec<MsrValue> = v1
            .msrs
            .iter()
            .map(|m| MsrValue {
                index: m.index,
                name: crate::cpu::msrs::name(m.index).unwrap_or_default().to_string(),
                value: m.data,
            })
            .collect();
        msrs.sort_by_key(|m| crate::cpu::msrs::restore_rank(m.index));
        VcpuStateV2 {
            regs: v1.regs,
            sregs: v1.sregs,
            xsave: v1.xsave,
            xcrs: v1.xcrs,
            lapic: v1.lapic,
            msrs,
            events: v1.events,
            mp_state: v1.mp_state,
            debugregs: v1.debugregs,
        }
    }
}

/// vCPU sections: v2 written, v1 loaded through the upgrade above.
impl Versioned for VcpuStateV2 {
    const CURRENT: u32 = 2;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(version: u32, bytes: &[u8]) -> Result<Self, String> {
        match version {
            1 => decode::<VcpuStateV1>(bytes).map(VcpuStateV2::from),
            _ => decode(bytes),
        }
        .map_err(|e| e.to_string())
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        encode(self).map_err(|e| e.to_string())
    }
}

/// Save a vCPU that is not running, with the MSRs `msrs` (index, name).
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &[(u32, &'static str)]) -> Result<VcpuStateV2, StateError> {
    let entries: Vec<kvm_msr_entry> =
        msrs.iter().map(|&(index, _)| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut list = Msrs::from_entries(&entries).map_err(|e| StateError::Codec(format!("MSR list: {e:?}")))?;
    let n = vcpu.get_msrs(&mut list).map_err(kvm("KVM_GET_MSRS"))?;
    if let Some(&(index, _)) = msrs.get(n) {
        return Err(StateError::Codec(format!(
            "KVM_GET_MSRS could not read {}",
            crate::cpu::msrs::label(index)
        )));
    }
    let values = list.as_slice()[..n]
        .iter()
        .zip(msrs)
        .map(|(e, &(index, name))| MsrValue { index, name: name.to_string(), value: e.data })
        .collect();
    Ok(VcpuStateV2 {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: values,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
    })
}

/// Load a vCPU's state (before it first runs, its CPUID installed), in
/// the order KVM needs: MSRs (in catalogue order: the TSC before the TSC
/// deadline), registers, special registers, XSAVE, XCRs, debug registers,
/// local APIC, MP state, then pending events.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuStateV2) -> Result<(), StateError> {
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|m| kvm_msr_entry { index: m.index, data: m.value, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Codec(format!("MSR list: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if let Some(m) = s.msrs.get(n) {
        return Err(StateError::Codec(format!(
            "this host's KVM refused {} = {:#x}",
            crate::cpu::msrs::label(m.index),
            m.value
        )));
    }
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the buffer is a whole kvm_xsave region saved by KVM_GET_XSAVE
    // on a vCPU with the same CPUID (the manifest's), so it is sized and
    // laid out as this vCPU's XSAVE area expects.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    vcpu.set_mp_state(s.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&s.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The in-kernel devices and the clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineStateV1 {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// The machine section has one version so far.
impl Versioned for MachineStateV1 {
    const CURRENT: u32 = 1;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(_version: u32, bytes: &[u8]) -> Result<Self, String> {
        decode(bytes).map_err(|e| e.to_string())
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        encode(self).map_err(|e| e.to_string())
    }
}

fn chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Save the irqchip, the PIT and kvmclock (vCPUs paused).
pub fn save_machine(vm: &VmFd) -> Result<MachineStateV1, StateError> {
    Ok(MachineStateV1 {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Load them into a fresh VM.
pub fn restore_machine(vm: &VmFd, s: &MachineStateV1) -> Result<(), StateError> {
    let mut pic_master = s.pic_master;
    pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    let mut pic_slave = s.pic_slave;
    pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    let mut ioapic = s.ioapic;
    ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    for c in [&pic_master, &pic_slave, &ioapic] {
        vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // Only the clock value is restored; flags describe the source host.
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

/// CBOR encode.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).map_err(|e| StateError::Codec(e.to_string()))?;
    Ok(out)
}

/// CBOR decode (malformed input is an error, never a panic).
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    ciborium::de::from_reader(bytes).map_err(|e| StateError::Codec(e.to_string()))
}
