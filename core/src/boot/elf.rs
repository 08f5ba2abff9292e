//! ELF kernels for the PVH boot path, both classes: ELF64 (`EM_X86_64`,
//! the test guest, a Linux vmlinux) and ELF32 (`EM_386`, small kernels and
//! boot stubs; the PVH ABI is 32-bit anyway).
//!
//! ```text
//!  ELF header  -> program headers -> PT_LOAD: copied to p_paddr, zero-filled to p_memsz
//!                                  -> PT_NOTE: "Xen" note of type 18
//!                                     (XEN_ELFNOTE_PHYS32_ENTRY): the 32-bit entry
//! ```
//!
//! Every offset and size is checked against the file before it is read,
//! so a truncated or hostile file is an error naming what is wrong, never
//! a panic.

/// Xen's note type for the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;

/// ELF class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// ELFCLASS32.
    Elf32,
    /// ELFCLASS64.
    Elf64,
}

/// One segment to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub paddr: u64,
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zeroed).
    pub memsz: u64,
}

/// A parsed kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its class.
    pub class: Class,
    /// PT_LOAD segments.
    pub segments: Vec<Segment>,
    /// The PVH entry, if the image has the note.
    pub pvh_entry: Option<u64>,
}

impl Image {
    /// One past the highest byte any segment occupies.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr.saturating_add(s.memsz)).max().unwrap_or(0)
    }
}

/// What is wrong with an ELF file (the reason; the caller names the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// No ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// An ELF for another machine or a class ferry does not boot.
    #[error("an ELF for {0}; ferry boots x86 kernels (ELF32 EM_386 or ELF64 EM_X86_64)")]
    Machine(String),
    /// A header or table that does not fit the file or is inconsistent.
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// No Xen PVH entry note.
    #[error("an ELF without a PVH entry note (Xen note XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote,
}

/// Reads little-endian fields at checked offsets.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn get(&self, at: u64, len: usize, what: &str) -> Result<&[u8], ElfError> {
        let start =
            usize::try_from(at).map_err(|_| ElfError::Malformed(format!("{what} beyond the file")))?;
        start
            .checked_add(len)
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| ElfError::Malformed(format!("{what} at {at:#x} beyond the end of the file")))
    }

    fn u16(&self, at: u64, what: &str) -> Result<u16, ElfError> {
        let b = self.get(at, 2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&self, at: u64, what: &str) -> Result<u32, ElfError> {
        let b = self.get(at, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, at: u64, what: &str) -> Result<u64, ElfError> {
        let b = self.get(at, 8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A word: 4 bytes in ELF32, 8 in ELF64.
    fn word(&self, class: Class, at: u64, what: &str) -> Result<u64, ElfError> {
        match class {
            Class::Elf32 => self.u32(at, what).map(u64::from),
            Class::Elf64 => self.u64(at, what),
        }
    }
}

/// Parse `file` (the whole kernel image).
pub fn parse(file: &[u8]) -> Result<Image, ElfError> {
    let b = Bytes(file);
    if file.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    let class = match file.get(4) {
        Some(1) => Class::Elf32,
        Some(2) => Class::Elf64,
        other => return Err(ElfError::Malformed(format!("ELF class {other:?}"))),
    };
    if file.get(5) != Some(&1) {
        return Err(ElfError::Machine("a big-endian machine".into()));
    }
    let machine = b.u16(18, "e_machine")?;
    match (class, machine) {
        (Class::Elf32, EM_386) | (Class::Elf64, EM_X86_64) => {}
        (c, m) => return Err(ElfError::Machine(format!("machine {m} ({c:?})"))),
    }
    // Program header table: e_phoff, e_phentsize, e_phnum.
    let (phoff, phentsize, phnum) = match class {
        Class::Elf32 => (u64::from(b.u32(28, "e_phoff")?), b.u16(42, "e_phentsize")?, b.u16(44, "e_phnum")?),
        Class::Elf64 => (b.u64(32, "e_phoff")?, b.u16(54, "e_phentsize")?, b.u16(56, "e_phnum")?),
    };
    let want = match class {
        Class::Elf32 => 32,
        Class::Elf64 => 56,
    };
    if phentsize != want {
        return Err(ElfError::Malformed(format!(
            "program header size {phentsize}, not {want} for {class:?}"
        )));
    }
    let mut image = Image { class, segments: Vec::new(), pvh_entry: None };
    for i in 0..u64::from(phnum) {
        let at = phoff + i * u64::from(phentsize);
        let what = format!("program header {i}");
        let p_type = b.u32(at, &what)?;
        // Field offsets differ by class: (offset, paddr, filesz, memsz).
        let (offset, paddr, filesz, memsz) = match class {
            Class::Elf32 => (at + 4, at + 12, at + 16, at + 20),
            Class::Elf64 => (at + 8, at + 24, at + 32, at + 40),
        };
        let seg = Segment {
            offset: b.word(class, offset, &what)?,
            paddr: b.word(class, paddr, &what)?,
            filesz: b.word(class, filesz, &what)?,
            memsz: b.word(class, memsz, &what)?,
        };
        match p_type {
            PT_LOAD => {
                if seg.filesz > seg.memsz {
                    return Err(ElfError::Malformed(format!("{what}: file size above memory size")));
                }
                let len = usize::try_from(seg.filesz).map_err(|_| ElfError::Malformed(what.clone()))?;
                b.get(seg.offset, len, &format!("{what}'s data"))?;
                image.segments.push(seg);
            }
            PT_NOTE => {
                if let Some(entry) = pvh_note(&b, &seg, &what)? {
                    image.pvh_entry = Some(entry);
                }
            }
            _ => {}
        }
    }
    if image.segments.is_empty() {
        return Err(ElfError::Malformed("no loadable segment".into()));
    }
    Ok(image)
}

/// The PVH entry from a PT_NOTE segment's notes, if one is Xen's.
fn pvh_note(b: &Bytes<'_>, seg: &Segment, what: &str) -> Result<Option<u64>, ElfError> {
    let align4 = |n: u64| n.div_ceil(4) * 4;
    let (mut at, end) = (seg.offset, seg.offset.saturating_add(seg.filesz));
    while at + 12 <= end {
        let namesz = u64::from(b.u32(at, what)?);
        let descsz = u64::from(b.u32(at + 4, what)?);
        let kind = b.u32(at + 8, what)?;
        let name_at = at + 12;
        let desc_at = name_at.saturating_add(align4(namesz));
        let next = desc_at.saturating_add(align4(descsz));
        if next > end {
            return Err(ElfError::Malformed(format!("{what}: a note runs past its segment")));
        }
        let name = b.get(name_at, namesz as usize, what)?;
        if name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            // 4 bytes in 32-bit kernels; Linux x86-64 writes a pointer-sized 8.
            let entry = match descsz {
                4 => u64::from(b.u32(desc_at, what)?),
                8 => b.u64(desc_at, what)?,
                n => return Err(ElfError::Malformed(format!("{what}: PVH entry note of {n} bytes"))),
            };
            return Ok(Some(entry));
        }
        at = next;
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal PVH kernel: `code` loaded at `paddr` and entered there,
    /// as an ELF of `class` (the same bytes the integration tests boot).
    pub fn kernel(class: Class, paddr: u32, code: &[u8]) -> Vec<u8> {
        let (ehsize, phsize) = match class {
            Class::Elf32 => (52u32, 32u32),
            Class::Elf64 => (64, 56),
        };
        let note = {
            let mut n = Vec::new();
            for v in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
                n.extend_from_slice(&v.to_le_bytes());
            }
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&paddr.to_le_bytes());
            n
        };
        let note_at = ehsize + 2 * phsize;
        let code_at = note_at + note.len() as u32;
        let mut f = vec![0x7f, b'E', b'L', b'F', if class == Class::Elf32 { 1 } else { 2 }, 1, 1, 0];
        f.resize(16, 0);
        let h16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
        let h32 = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
        let word = |f: &mut Vec<u8>, v: u32| match class {
            Class::Elf32 => f.extend_from_slice(&v.to_le_bytes()),
            Class::Elf64 => f.extend_from_slice(&u64::from(v).to_le_bytes()),
        };
        h16(&mut f, 2); // ET_EXEC
        h16(&mut f, if class == Class::Elf32 { EM_386 } else { EM_X86_64 });
        h32(&mut f, 1);
        word(&mut f, paddr); // e_entry
        word(&mut f, ehsize); // e_phoff
        word(&mut f, 0); // e_shoff
        h32(&mut f, 0); // e_flags
        for v in [ehsize as u16, phsize as u16, 2, 0, 0, 0] {
            h16(&mut f, v);
        }
        for (p_type, offset, addr, size) in
            [(PT_NOTE, note_at, 0, note.len() as u32), (PT_LOAD, code_at, paddr, code.len() as u32)]
        {
            h32(&mut f, p_type);
            match class {
                Class::Elf32 => {
                    for v in [offset, addr, addr, size, size, 5, 4] {
                        h32(&mut f, v);
                    }
                }
                Class::Elf64 => {
                    h32(&mut f, 5);
                    for v in [offset, addr, addr, size, size, 4] {
                        word(&mut f, v);
                    }
                }
            }
        }
        f.extend_from_slice(&note);
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn both_classes_parse_to_the_same_image() {
        for class in [Class::Elf32, Class::Elf64] {
            let img = parse(&kernel(class, 0x10_0000, &[0xf4; 7])).unwrap();
            assert_eq!(img.class, class);
            assert_eq!(img.pvh_entry, Some(0x10_0000));
            assert_eq!(img.segments.len(), 1);
            assert_eq!((img.segments[0].paddr, img.segments[0].filesz), (0x10_0000, 7));
            assert_eq!(img.end(), 0x10_0007);
        }
    }

    #[test]
    fn what_is_not_a_pvh_kernel_says_why() {
        assert_eq!(parse(b"hello, world"), Err(ElfError::NotElf));
        let mut k = kernel(Class::Elf32, 0x10_0000, &[0xf4]);
        k[18] = 40; // EM_ARM
        assert_eq!(
            parse(&k).unwrap_err().to_string(),
            "an ELF for machine 40 (Elf32); ferry boots x86 kernels (ELF32 EM_386 or ELF64 EM_X86_64)"
        );
        let k = kernel(Class::Elf64, 0x10_0000, &[0xf4]);
        for cut in [20, 70, 130, k.len() - 1] {
            assert!(matches!(parse(&k[..cut]), Err(ElfError::Malformed(_))), "cut at {cut}");
        }
        let mut other_note = kernel(Class::Elf32, 0x10_0000, &[0xf4]);
        other_note[52 + 2 * 32 + 8] = 17; // the note's type: 17, not the PVH entry's 18
        assert_eq!(parse(&other_note).unwrap().pvh_entry, None);
    }
}
