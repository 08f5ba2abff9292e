//! vCPU entry state: local APIC interrupt pins, and the boot CPU's
//! registers: PVH (32-bit protected mode, flat segments, paging off) or the
//! Linux 64-bit entry (long mode, identity-mapped, flat segments). The
//! CPUID a vCPU gets is the CPU model's (`crate::cpu`).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::{linux::LinuxEntry, pvh::PvhEntry, BootError, Entry};
use crate::memory::GuestRam;

/// Where the boot GDT lives.
pub const GDT_ADDR: u64 = 0x500;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// GDT entries: null, 32-bit code, data, TSS (all flat).
const GDT: [u64; 4] =
    [0, gdt_entry(0xc09b, 0, 0xffff_ffff), gdt_entry(0xc093, 0, 0xffff_ffff), gdt_entry(0x008b, 0, 0x67)];

/// Encode a segment descriptor from access/flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The KVM segment that a descriptor loads.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[off + i] = *byte as std::os::raw::c_char;
    }
}

/// Wire the local APIC pins as firmware does: LINT0 takes the 8259's
/// interrupts (ExtINT) on the boot CPU, LINT1 is NMI everywhere.
pub fn setup_lapic(vcpu: &VcpuFd, index: u8) -> Result<(), BootError> {
    let err = |source| BootError::Vcpu { cpu: index, source };
    let mut lapic = vcpu.get_lapic().map_err(err)?;
    let with_mode = |v: u32, mode: u32| (v & !0x0001_0700) | (mode << 8);
    if index == 0 {
        let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
        set_lapic_reg(&mut lapic.regs, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    }
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(err)
}

/// The Linux boot protocol's GDT: __BOOT_CS (0x10) is 64-bit code,
/// __BOOT_DS (0x18) flat data, then a TSS (0x20).
const LINUX_GDT: [u64; 5] =
    [0, 0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// Write the boot GDT for `entry`'s protocol into guest memory.
pub fn write_gdt(ram: &GuestRam, entry: &Entry) -> Result<(), BootError> {
    let table: &[u64] = match entry {
        Entry::Pvh(_) => &GDT,
        Entry::Linux(_) => &LINUX_GDT,
    };
    for (i, e) in table.iter().enumerate() {
        ram.mem()
            .write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| BootError::GuestMemory { what: "GDT", reason: e.to_string() })?;
    }
    Ok(())
}

/// Put the boot CPU into the PVH entry state.
pub fn setup_pvh_bsp(vcpu: &VcpuFd, entry: &PvhEntry) -> Result<(), BootError> {
    let err = |source| BootError::Vcpu { cpu: 0, source };
    let mut sregs = vcpu.get_sregs().map_err(err)?;
    sregs.cs = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(err)?;

    let regs = kvm_regs { rip: entry.entry, rbx: entry.start_info, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(err)?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(err)
}

/// Put the boot CPU into the Linux 64-bit entry state.
pub fn setup_linux_bsp(vcpu: &VcpuFd, entry: &LinuxEntry) -> Result<(), BootError> {
    let err = |source| BootError::Vcpu { cpu: 0, source };
    let mut sregs = vcpu.get_sregs().map_err(err)?;
    linux_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(err)?;
    let regs = kvm_regs {
        rip: entry.entry,
        rsi: entry.zero_page,
        rsp: super::linux::BOOT_STACK,
        rbp: super::linux::BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err)?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(err)
}

/// Long mode: paging on the identity map, PAE, LME/LMA, 64-bit code.
fn linux_sregs(sregs: &mut kvm_bindings::kvm_sregs) {
    sregs.cs = segment(LINUX_GDT[2], 0x10);
    let data = segment(LINUX_GDT[3], 0x18);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(LINUX_GDT[4], 0x20);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&LINUX_GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = super::linux::PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0011; // PG, ET, PE
    sregs.efer |= 0x500; // LME, LMA
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(GDT[1], CODE_SELECTOR);
        assert_eq!(
            (code.base, code.limit, code.type_, code.db, code.g, code.present),
            (0, 0xffff_ffff, 0xb, 1, 1, 1)
        );
        let data = segment(GDT[2], DATA_SELECTOR);
        assert_eq!((data.type_, data.s), (0x3, 1));
        let tss = segment(GDT[3], TSS_SELECTOR);
        assert_eq!((tss.limit, tss.type_, tss.s, tss.g), (0x67, 0xb, 0, 0));
    }

    #[test]
    fn linux_entry_state_is_long_mode_with_boot_selectors() {
        let mut sregs = kvm_bindings::kvm_sregs::default();
        linux_sregs(&mut sregs);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.present), (0x10, 1, 0, 1));
        assert_eq!((sregs.ds.selector, sregs.ss.selector, sregs.ds.type_), (0x18, 0x18, 0x3));
        assert_eq!(sregs.cr3, super::super::linux::PML4);
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001, "paging and protection on");
        assert_eq!(sregs.cr4 & 0x20, 0x20, "PAE");
        assert_eq!(sregs.efer & 0x500, 0x500, "LME and LMA");
        assert_eq!(LINUX_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(LINUX_GDT[3], 0x00cf_9300_0000_ffff);
    }
}
