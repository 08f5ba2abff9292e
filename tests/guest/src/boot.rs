//! PVH entry point, GDT, identity page tables and the boot stack.
//!
//! PVH boot ABI (Xen "HVM direct boot", also used by QEMU and rust-vmm's
//! linux-loader): the loader finds the 32-bit entry address in an ELF note
//! (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18) and enters it in 32-bit
//! protected mode with paging off, flat 4 GiB CS/DS, and `ebx` holding the
//! physical address of `struct hvm_start_info`.
//!
//! The entry code zeroes `.bss`, identity-maps the first 4 GiB with 2 MiB
//! pages (PML4[0] -> PDPT -> PD0..PD3), enables PAE + EFER.LME + paging,
//! far-jumps to 64-bit code and calls `main(start_info)`. RAM above 4 GiB is
//! mapped later from Rust once the memory map is known
//! ([`extend_identity_map`]).

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

/// GDT selectors (shared with the AP trampoline in `smp.rs`).
pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;

/// Highest amount of physical address space that gets identity-mapped.
pub const MAX_MAPPED_GIB: usize = 64;
/// Always mapped by the entry code (covers the LAPIC at 0xFEE0_0000).
const BOOT_MAPPED_GIB: usize = 4;
const BOOT_STACK_SIZE: usize = 64 * 1024;

/// 2 MiB page-directory entry flags: present | writable | page size.
const PDE_LARGE: u64 = 0x83;
/// Table entry flags: present | writable.
const TABLE_FLAGS: u64 = 0x03;

global_asm!(
    r#"
    /* ---- Xen PVH ELF note: 32-bit physical entry address ---- */
    .pushsection .note.pvh, "a", @note
    .balign 4
    .long 4                     /* n_namesz: "Xen\0" */
    .long 4                     /* n_descsz: one 32-bit address */
    .long 18                    /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32
    .popsection

    /* ---- GDT: null, 64-bit code, flat data, 32-bit code ---- */
    .pushsection .rodata.boot_gdt, "a"
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF    /* {code64}: long-mode code, DPL0     */
    .quad 0x00CF93000000FFFF    /* {data}: flat 4 GiB read/write data */
    .quad 0x00CF9B000000FFFF    /* {code32}: flat 4 GiB 32-bit code   */
    .global boot_gdt_end
boot_gdt_end:
    .balign 8
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .popsection

    /* ---- page tables: PML4, PDPT, up to {max_gib} page directories ---- */
    .pushsection .pagetables, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
    .global boot_pdpt
boot_pdpt:
    .skip 4096
    .global boot_pd
boot_pd:
    .skip 4096 * {max_gib}
    .popsection

    /* ---- BSP stack ---- */
    .pushsection .stacks, "aw", @nobits
    .balign 4096
    .skip {stack_size}
boot_stack_top:
    .popsection

    /* ---- 32-bit PVH entry ---- */
    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi              /* keep the hvm_start_info address */
    lgdt boot_gdt_ptr
    ljmp ${code32}, $pvh_reload_cs
pvh_reload_cs:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %esp

    /* zero .bss (Rust statics) */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    /* zero PML4 + PDPT (two adjacent pages) */
    mov $boot_pml4, %edi
    mov $2048, %ecx
    rep stosl

    /* PML4[0] -> PDPT */
    mov $boot_pdpt, %eax
    or ${table_flags}, %eax
    mov %eax, boot_pml4

    /* PDPT[0..4] -> PD0..PD3 */
    mov $boot_pd, %eax
    or ${table_flags}, %eax
    mov $boot_pdpt, %edi
    mov ${boot_gib}, %ecx
1:
    mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b

    /* PD0..PD3: 2048 x 2 MiB identity pages. From 3 GiB up (MMIO: LAPIC,
       IOAPIC, ...) the pages are also cache-disabled (PCD | PWT). */
    mov $boot_pd, %edi
    mov ${pde_large}, %eax
2:
    mov %eax, (%edi)
    movl $0, 4(%edi)
    add $8, %edi
    add $0x200000, %eax
    cmp $(0xC0000000 | {pde_large}), %eax
    jne 3f
    or $0x18, %eax
3:
    cmp $(boot_pd + 4096 * {boot_gib}), %edi
    jb 2b

    /* CR4.PAE, CR3, EFER.LME, then CR0.PG (+PE) -> IA-32e mode */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp ${code64}, $pvh_start64

    .code64
pvh_start64:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea boot_stack_top(%rip), %rsp
    mov %esi, %edi              /* main(start_info: u64), zero-extended */
    call main
4:
    cli
    hlt
    jmp 4b
    .popsection
"#,
    code64 = const SEL_CODE64,
    data = const SEL_DATA,
    code32 = const SEL_CODE32,
    max_gib = const MAX_MAPPED_GIB,
    boot_gib = const BOOT_MAPPED_GIB,
    stack_size = const BOOT_STACK_SIZE,
    table_flags = const TABLE_FLAGS,
    pde_large = const PDE_LARGE,
    options(att_syntax)
);

extern "C" {
    static mut boot_pdpt: [u64; 512];
    static mut boot_pd: [u64; 512 * MAX_MAPPED_GIB];
}

/// Physical address of the PML4 (what CR3 holds), for the AP trampoline.
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Identity-maps physical memory up to `top` (rounded up to whole GiB,
/// capped at [`MAX_MAPPED_GIB`]) in addition to the first 4 GiB.
/// Must run on the BSP before the APs are started.
pub fn extend_identity_map(top: u64) {
    let gib = (top.div_ceil(1 << 30) as usize).min(MAX_MAPPED_GIB);
    if gib <= BOOT_MAPPED_GIB {
        return;
    }
    // SAFETY: the page tables are ours (reserved in `.pagetables`), and the
    // entries written here (PD4.. and PDPT[4..]) are not in use yet: the
    // PDPT entries are still zero (not present), so no CPU can be walking
    // these page directories. Only the BSP runs at this point.
    unsafe {
        let pdpt = addr_of_mut!(boot_pdpt) as *mut u64;
        let pd = addr_of_mut!(boot_pd) as *mut u64;
        for g in BOOT_MAPPED_GIB..gib {
            let dir = pd.add(g * 512);
            for i in 0..512 {
                let phys = ((g * 512 + i) as u64) << 21;
                dir.add(i).write(phys | PDE_LARGE);
            }
            pdpt.add(g).write(dir as u64 | TABLE_FLAGS);
        }
        // Reload CR3 so no stale paging-structure cache entry survives.
        asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags));
    }
}
