//! PVH kernels made by hand: the test guest rewrapped as a 32- or 64-bit
//! ELF, to check that ferry's loader takes both.

/// ELF class for [`pvh_elf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfClass {
    /// ELFCLASS32, EM_386.
    Elf32,
    /// ELFCLASS64, EM_X86_64.
    Elf64,
}

/// Write a PVH kernel: an ELF of `class` with one PT_LOAD per segment
/// `(physical address, bytes, memory size)` and a PT_NOTE holding Xen's
/// PHYS32_ENTRY note for `entry`, as a linker would lay it out.
pub fn pvh_elf(class: ElfClass, segments: &[(u64, &[u8], u64)], entry: u32) -> Vec<u8> {
    let (ehsize, phsize): (u64, u64) = match class {
        ElfClass::Elf32 => (52, 32),
        ElfClass::Elf64 => (64, 56),
    };
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    let phnum = 1 + segments.len() as u64;
    let note_at = ehsize + phnum * phsize;
    let mut data_at = Vec::new();
    let mut at = (note_at + note.len() as u64).div_ceil(16) * 16;
    for (_, bytes, _) in segments {
        data_at.push(at);
        at = (at + bytes.len() as u64).div_ceil(16) * 16;
    }
    let mut f: Vec<u8> = vec![0x7f, b'E', b'L', b'F', if class == ElfClass::Elf32 { 1 } else { 2 }, 1, 1];
    f.resize(16, 0);
    let word = |f: &mut Vec<u8>, v: u64| match class {
        ElfClass::Elf32 => f.extend_from_slice(&(v as u32).to_le_bytes()),
        ElfClass::Elf64 => f.extend_from_slice(&v.to_le_bytes()),
    };
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&(if class == ElfClass::Elf32 { 3u16 } else { 62 }).to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    word(&mut f, u64::from(entry));
    word(&mut f, ehsize); // program headers right after the ELF header
    word(&mut f, 0); // no section headers
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [ehsize as u16, phsize as u16, phnum as u16, 0, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let mut headers = vec![(4u32, note_at, 0u64, note.len() as u64, note.len() as u64, 4u32)];
    for ((paddr, bytes, memsz), off) in segments.iter().zip(&data_at) {
        headers.push((1, *off, *paddr, bytes.len() as u64, *memsz, 7));
    }
    for (p_type, offset, addr, filesz, memsz, flags) in headers {
        f.extend_from_slice(&p_type.to_le_bytes());
        match class {
            ElfClass::Elf32 => {
                for v in [offset, addr, addr, filesz, memsz, u64::from(flags), 4] {
                    word(&mut f, v);
                }
            }
            ElfClass::Elf64 => {
                f.extend_from_slice(&flags.to_le_bytes());
                for v in [offset, addr, addr, filesz, memsz, 4] {
                    word(&mut f, v);
                }
            }
        }
    }
    f.extend_from_slice(&note);
    for ((_, bytes, _), off) in segments.iter().zip(&data_at) {
        f.resize(*off as usize, 0);
        f.extend_from_slice(bytes);
    }
    f
}

/// The bundled test guest rewritten as an ELF of `class`: the same
/// segments and PVH entry (its entry is 32-bit code either way).
pub fn test_guest_as(class: ElfClass) -> Vec<u8> {
    let file = ferry::boot::TEST_GUEST;
    let image = ferry::boot::elf::parse(file).expect("the test guest is a PVH ELF");
    let entry = u32::try_from(image.pvh_entry.expect("PVH note")).expect("a 32-bit entry");
    let segments: Vec<(u64, &[u8], u64)> = image
        .segments
        .iter()
        .map(|s| (s.paddr, &file[s.offset as usize..(s.offset + s.filesz) as usize], s.memsz))
        .collect();
    pvh_elf(class, &segments, entry)
}
