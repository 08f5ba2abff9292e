//! Linux boot protocol (x86 64-bit entry): a bzImage's protected-mode
//! kernel is loaded at 1 MiB, the zero page (`boot_params`) carries the
//! setup header, the e820 map, the command line and the initramfs, and the
//! boot CPU starts in long mode at the kernel's 64-bit entry (load address +
//! 0x200) with `rsi` pointing at the zero page. Linux finds every vCPU in the
//! MP table and the virtio devices through PCI configuration mechanism 1.
//!
//! ```text
//!  0x0500  GDT: null, null, code64 (0x10), data (0x18), TSS (0x20)
//!  0x7000  zero page (boot_params, 4 KiB)
//!  0x8ff0  initial stack
//!  0x9000  PML4, 0xa000 PDPT, 0xb000..0xefff four PDs: the first 4 GiB
//!          identity-mapped with 2 MiB pages
//!  0x20000 command line
//!  0x9fc00 MP table
//!  1 MiB   protected-mode kernel
//!  top of RAM below min(initrd_addr_max, 3 GiB): initramfs
//! ```

use std::{fs::File, io::Read, path::Path};

use linux_loader::loader::{bootparam::boot_params, bzimage::BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{pvh, BootError};
use crate::memory::GuestRam;

/// Zero page address.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-table root.
pub const PML4: u64 = 0x9000;
/// The PDPT.
pub const PDPT: u64 = 0xa000;
/// The first of four page directories.
pub const PD: u64 = 0xb000;
/// Offset of the 64-bit entry from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;

const KERNEL_LOADER_OTHER: u8 = 0xff;
const CAN_USE_HEAP: u8 = 0x80;
const HEAP_END: u16 = 0xfe00;

/// The boot_params struct, as bytes vm-memory can write.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is plain old data: integers and arrays of integers,
// with no padding that carries meaning and any bit pattern valid.
unsafe impl ByteValued for ZeroPage {}

/// Is `head` (the first 0x210 bytes or more of a file) a bzImage?
pub fn is_bzimage(head: &[u8]) -> bool {
    head.len() >= 0x206 && head[0x1fe..0x200] == [0x55, 0xaa] && &head[0x202..0x206] == b"HdrS"
}

/// Where the boot CPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    /// 64-bit entry point.
    pub entry: u64,
    /// Zero page address (goes into `rsi`).
    pub zero_page: u64,
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::GuestMemory { what, reason: e.to_string() }
}

/// Load a bzImage and write the zero page, the command line, the MP table,
/// the initramfs and the identity page tables.
pub fn load(
    ram: &GuestRam,
    path: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    cpus: u8,
) -> Result<LinuxEntry, BootError> {
    let shown = path.display().to_string();
    let mut file =
        File::open(path).map_err(|source| BootError::KernelUnreadable { path: shown.clone(), source })?;
    let loaded = BzImage::load(ram.mem(), None, &mut file, Some(GuestAddress(pvh::KERNEL_MIN)))
        .map_err(|e| BootError::NotBootable { path: shown.clone(), reason: e.to_string() })?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| BootError::NotBootable { path: shown.clone(), reason: "no setup header".into() })?;

    super::write_cmdline_and_mptable(ram, cmdline, cpus)?;

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END;
    hdr.cmd_line_ptr = pvh::CMDLINE as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(initrd) = initramfs {
        let limit = match hdr.initrd_addr_max {
            0 => 0x37ff_ffff, // the protocol's default before 2.03
            max => u64::from(max),
        };
        let (addr, size) = pvh::load_initramfs(ram, initrd, loaded.kernel_end, limit)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = ZeroPage::default();
    params.0.hdr = hdr;
    let map = pvh::memory_map(ram);
    for (i, e) in map.iter().enumerate().take(params.0.e820_table.len()) {
        params.0.e820_table[i].addr = e.addr;
        params.0.e820_table[i].size = e.size;
        params.0.e820_table[i].r#type = e.type_;
    }
    params.0.e820_entries = map.len().min(params.0.e820_table.len()) as u8;
    ram.mem().write_obj(params, GuestAddress(ZERO_PAGE)).map_err(mem_err("zero page"))?;

    write_identity_map(ram)?;
    Ok(LinuxEntry { entry: loaded.kernel_load.0 + ENTRY_64_OFFSET, zero_page: ZERO_PAGE })
}

/// Identity-map the first 4 GiB with 2 MiB pages.
fn write_identity_map(ram: &GuestRam) -> Result<(), BootError> {
    let mem = ram.mem();
    let present_rw = 0x3u64;
    mem.write_obj(PDPT | present_rw, GuestAddress(PML4)).map_err(mem_err("page tables"))?;
    for gib in 0..4u64 {
        let pd = PD + gib * 0x1000;
        mem.write_obj(pd | present_rw, GuestAddress(PDPT + gib * 8)).map_err(mem_err("page tables"))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8)).map_err(mem_err("page tables"))?;
            // present, rw, 2 MiB
        }
    }
    Ok(())
}

/// What a kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ELF (booted through its PVH note).
    Elf,
    /// Linux bzImage.
    BzImage,
    /// Neither.
    Unknown,
}

/// Look at the start of a kernel file.
pub fn sniff(path: &Path) -> Result<Format, BootError> {
    let shown = path.display().to_string();
    let mut f =
        File::open(path).map_err(|source| BootError::KernelUnreadable { path: shown.clone(), source })?;
    let mut head = vec![0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(source) => return Err(BootError::KernelUnreadable { path: shown, source }),
        }
    }
    let head = &head[..n];
    Ok(if head.starts_with(b"\x7fELF") {
        Format::Elf
    } else if is_bzimage(head) {
        Format::BzImage
    } else {
        Format::Unknown
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal bzImage: 4 setup sectors after the boot sector, protocol
    /// 2.15, loaded high, and a 3-page "kernel" whose bytes count up.
    pub fn synthetic_bzimage() -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img.extend((0..3 * 4096u32).map(|i| (i % 251) as u8));
        img
    }

    fn read<T: ByteValued>(ram: &GuestRam, addr: u64) -> T {
        ram.mem().read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn zero_page_e820_cmdline_initrd_and_page_tables_follow_the_boot_protocol() {
        let dir = std::env::temp_dir();
        let kernel = dir.join(format!("ferry-bz-{}.img", std::process::id()));
        let initrd = dir.join(format!("ferry-initrd-{}.img", std::process::id()));
        std::fs::write(&kernel, synthetic_bzimage()).unwrap();
        std::fs::write(&initrd, vec![0x5au8; 10_000]).unwrap();
        assert_eq!(sniff(&kernel).unwrap(), Format::BzImage);

        let ram = GuestRam::new(256 << 20).unwrap();
        let entry = load(&ram, &kernel, Some(&initrd), "console=ttyS0 root=/dev/vda", 4).unwrap();
        let _ = std::fs::remove_file(&kernel);
        let _ = std::fs::remove_file(&initrd);

        assert_eq!(entry.entry, 0x10_0200, "64-bit entry: load address + 0x200");
        assert_eq!(entry.zero_page, 0x7000);
        // The protected-mode kernel is at 1 MiB, byte for byte.
        assert_eq!(read::<u8>(&ram, 0x10_0000 + 300), (300 % 251) as u8);

        let zp = ZERO_PAGE;
        assert_eq!(read::<u16>(&ram, zp + 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(read::<u32>(&ram, zp + 0x202), 0x5372_6448, "HdrS");
        assert_eq!(read::<u8>(&ram, zp + 0x210), 0xff, "type_of_loader");
        assert_eq!(read::<u8>(&ram, zp + 0x211), 0x81, "loadflags: LOADED_HIGH | CAN_USE_HEAP");
        assert_eq!(read::<u16>(&ram, zp + 0x224), 0xfe00, "heap_end_ptr");
        assert_eq!(read::<u32>(&ram, zp + 0x228), 0x2_0000, "cmd_line_ptr");
        let mut cmd = [0u8; 28];
        ram.mem().read_slice(&mut cmd, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 root=/dev/vda\0");
        let (rd_addr, rd_size) = (read::<u32>(&ram, zp + 0x218), read::<u32>(&ram, zp + 0x21c));
        assert_eq!(rd_size, 10_000);
        assert_eq!(rd_addr % 4096, 0);
        assert!(u64::from(rd_addr) + 10_000 <= 256 << 20);
        assert_eq!(read::<u8>(&ram, u64::from(rd_addr) + 9_999), 0x5a);

        // e820: RAM below the MP table, the MP table reserved, RAM from 1 MiB.
        assert_eq!(read::<u8>(&ram, zp + 0x1e8), 3, "e820_entries");
        let e820 = |i: u64| -> (u64, u64, u32) {
            let at = zp + 0x2d0 + 20 * i;
            (read(&ram, at), read(&ram, at + 8), read(&ram, at + 16))
        };
        assert_eq!(e820(0), (0, 0x9_fc00, 1));
        assert_eq!(e820(1), (0x9_fc00, 0x400, 2));
        assert_eq!(e820(2), (0x10_0000, (256 << 20) - 0x10_0000, 1));

        // Identity map: PML4 -> PDPT -> 4 PDs of 2 MiB pages.
        assert_eq!(read::<u64>(&ram, PML4), PDPT | 3);
        for gib in 0..4 {
            assert_eq!(read::<u64>(&ram, PDPT + 8 * gib), (PD + 0x1000 * gib) | 3);
        }
        assert_eq!(read::<u64>(&ram, PD), 0x83);
        assert_eq!(read::<u64>(&ram, PD + 3 * 0x1000 + 511 * 8), ((4u64 << 30) - (2 << 20)) | 0x83);

        // The MP table lists all four vCPUs.
        let mut mp = [0u8; 4];
        ram.mem().read_slice(&mut mp, GuestAddress(0x9_fc00)).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn elf_and_text_files_are_not_bzimages() {
        assert!(!is_bzimage(b"\x7fELF...."));
        assert!(!is_bzimage(&[0u8; 0x300]));
        assert!(is_bzimage(&synthetic_bzimage()));
    }
}
