//! PVH boot: load an ELF kernel (ELF32 or ELF64) that carries a
//! `XEN_ELFNOTE_PHYS32_ENTRY` note (`elf.rs` reads it), and write
//! `hvm_start_info`, the memory map, the module list (initramfs) and the
//! command line.
//!
//! ```text
//!  0x0500  GDT for the 32-bit entry state (see cpu.rs)
//!  0x6000  hvm_start_info
//!  0x6040  hvm_modlist_entry (initramfs, if any)
//!  0x7000  hvm_memmap_table_entry[]
//!  0x20000 command line (NUL-terminated, at most 64 KiB)
//!  0x9fc00 MP table (reserved in the memory map)
//!  1 MiB   kernel (the ELF's physical addresses)
//!  top of RAM below 3 GiB: initramfs
//! ```

use std::path::Path;

use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use super::{elf, mptable, BootError, Kernel};
use crate::memory::GuestRam;

/// `hvm_start_info` address.
pub const START_INFO: u64 = 0x6000;
/// Module list address.
pub const MODLIST: u64 = 0x6040;
/// Memory map address.
pub const MEMMAP: u64 = 0x7000;
/// Command line address.
pub const CMDLINE: u64 = 0x2_0000;
/// Largest command line, including the NUL.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Kernels load at or above 1 MiB.
pub const KERNEL_MIN: u64 = 0x10_0000;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What the boot CPU needs to start.
#[derive(Debug, Clone, Copy)]
pub struct PvhEntry {
    /// 32-bit entry point.
    pub entry: u64,
    /// Address of `hvm_start_info` (goes into `ebx`).
    pub start_info: u64,
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::GuestMemory { what, reason: e.to_string() }
}

/// Load the kernel and write every PVH boot structure for `cpus` vCPUs.
pub fn load(
    ram: &GuestRam,
    kernel: &Kernel,
    initramfs: Option<&Path>,
    cmdline: &str,
    cpus: u8,
) -> Result<PvhEntry, BootError> {
    let kernel_end = match kernel {
        Kernel::TestGuest => load_elf(ram, super::TEST_GUEST, "test guest")?,
        Kernel::File(path) => {
            let shown = path.display().to_string();
            let bytes = std::fs::read(path)
                .map_err(|source| BootError::KernelUnreadable { path: shown.clone(), source })?;
            load_elf(ram, &bytes, &shown)?
        }
    };
    let entry = kernel_end.0;

    super::write_cmdline_and_mptable(ram, cmdline, cpus)?;

    let mut start =
        hvm_start_info { magic: START_INFO_MAGIC, version: 1, cmdline_paddr: CMDLINE, ..Default::default() };

    if let Some(path) = initramfs {
        let (addr, size) = load_initramfs(ram, path, kernel_end.1, u64::MAX)?;
        let module = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        ram.mem().write_obj(module, GuestAddress(MODLIST)).map_err(mem_err("module list"))?;
        start.nr_modules = 1;
        start.modlist_paddr = MODLIST;
    }

    let memmap = memory_map(ram);
    for (i, e) in memmap.iter().enumerate() {
        let at = MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        ram.mem().write_obj(*e, GuestAddress(at)).map_err(mem_err("memory map"))?;
    }
    start.memmap_paddr = MEMMAP;
    start.memmap_entries = memmap.len() as u32;
    ram.mem().write_obj(start, GuestAddress(START_INFO)).map_err(mem_err("hvm_start_info"))?;

    Ok(PvhEntry { entry, start_info: START_INFO })
}

/// Load the ELF in `file`; returns (PVH entry, end of the kernel image).
fn load_elf(ram: &GuestRam, file: &[u8], shown: &str) -> Result<(u64, u64), BootError> {
    let not_pvh = |reason: String| BootError::NotPvh { path: shown.to_string(), reason };
    let image = elf::parse(file).map_err(|e| not_pvh(e.to_string()))?;
    let entry = image.pvh_entry.ok_or_else(|| not_pvh(elf::ElfError::NoPvhNote.to_string()))?;
    for s in &image.segments {
        if s.paddr < KERNEL_MIN || ram.bytes(s.paddr, s.memsz).is_none() {
            return Err(not_pvh(format!(
                "a segment at {:#x}..{:#x} is outside guest RAM from 1 MiB",
                s.paddr,
                s.paddr.saturating_add(s.memsz)
            )));
        }
        let start = s.offset as usize; // checked against the file by elf::parse
        let data = &file[start..start + s.filesz as usize];
        ram.mem().write_slice(data, GuestAddress(s.paddr)).map_err(mem_err("kernel"))?;
        let zeros = vec![0u8; (s.memsz - s.filesz) as usize];
        ram.mem().write_slice(&zeros, GuestAddress(s.paddr + s.filesz)).map_err(mem_err("kernel"))?;
    }
    if ram.bytes(entry, 1).is_none() {
        return Err(not_pvh(format!("the PVH entry {entry:#x} is outside guest RAM")));
    }
    Ok((entry, image.end()))
}

/// Put the initramfs at the top of RAM below 3 GiB (and at or below
/// `limit`, its last allowed byte), page aligned, above the kernel.
pub fn load_initramfs(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path)
        .map_err(|source| BootError::InitramfsUnreadable { path: shown.clone(), source })?;
    let size = data.len() as u64;
    let top = ram.low_end().min(limit.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end.max(KERNEL_MIN) => {
            ram.mem().write_slice(&data, GuestAddress(addr)).map_err(mem_err("initramfs"))?;
            Ok((addr, size))
        }
        _ => Err(BootError::InitramfsTooBig { path: shown, size }),
    }
}

/// The e820-style memory map: RAM, the reserved MP table KiB, RAM from 1 MiB.
pub fn memory_map(ram: &GuestRam) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry { addr, size, type_, reserved: 0 };
    let mut map = vec![
        entry(0, mptable::MPTABLE_START, E820_RAM),
        entry(mptable::MPTABLE_START, mptable::MPTABLE_SIZE as u64, E820_RESERVED),
    ];
    for r in ram.ranges() {
        if r.gpa == 0 {
            map.push(entry(KERNEL_MIN, r.len - KERNEL_MIN, E820_RAM));
        } else {
            map.push(entry(r.gpa, r.len, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_loads_with_start_info_and_memory_map() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let entry = load(&ram, &Kernel::TestGuest, None, "ready exit=3", 2).unwrap();
        assert!(entry.entry >= KERNEL_MIN && entry.entry < 64 << 20);
        let info: hvm_start_info = ram.mem().read_obj(GuestAddress(START_INFO)).unwrap();
        assert_eq!(info.magic, START_INFO_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE);
        assert_eq!(info.memmap_entries, 3);
        let mut cmd = [0u8; 13];
        ram.mem().read_slice(&mut cmd, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&cmd, b"ready exit=3\0");
        let last: hvm_memmap_table_entry = ram
            .mem()
            .read_obj(GuestAddress(MEMMAP + 2 * std::mem::size_of::<hvm_memmap_table_entry>() as u64))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), (KERNEL_MIN, (64 << 20) - KERNEL_MIN, E820_RAM));
        let mut mp = [0u8; 4];
        ram.mem().read_slice(&mut mp, GuestAddress(mptable::MPTABLE_START)).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn elf32_and_elf64_kernels_load_at_their_addresses() {
        use super::elf::{tests::kernel, Class};
        for class in [Class::Elf32, Class::Elf64] {
            let path = std::env::temp_dir().join(format!("ferry-pvh-{class:?}-{}", std::process::id()));
            std::fs::write(&path, kernel(class, 0x20_0000, b"\xf4\xeb\xfd")).unwrap();
            let ram = GuestRam::new(16 << 20).unwrap();
            let entry = load(&ram, &Kernel::File(path.clone()), None, "", 1);
            let _ = std::fs::remove_file(&path);
            assert_eq!(entry.unwrap().entry, 0x20_0000, "{class:?}");
            let mut code = [0u8; 3];
            ram.mem().read_slice(&mut code, GuestAddress(0x20_0000)).unwrap();
            assert_eq!(&code, b"\xf4\xeb\xfd");
        }
        let path = std::env::temp_dir().join(format!("ferry-pvh-low-{}", std::process::id()));
        std::fs::write(&path, kernel(Class::Elf32, 0x1000, b"\xf4")).unwrap();
        let err =
            load(&GuestRam::new(16 << 20).unwrap(), &Kernel::File(path.clone()), None, "", 1).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.to_string().contains("a segment at 0x1000..0x1001 is outside guest RAM from 1 MiB"),
            "{err}"
        );
    }

    #[test]
    fn a_non_elf_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-pvh-test-{}", std::process::id()));
        std::fs::write(&dir, b"this is not an ELF file at all, just text").unwrap();
        let ram = GuestRam::new(16 << 20).unwrap();
        let err = load(&ram, &Kernel::File(dir.clone()), None, "", 1).unwrap_err();
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(err, BootError::NotPvh { .. }), "{err}");
    }
}
