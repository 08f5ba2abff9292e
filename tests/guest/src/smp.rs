//! Application-processor start-up (INIT + SIPI + SIPI) and the real-mode
//! trampoline.
//!
//! A SIPI with vector V starts the target CPU in real mode at CS = V << 8,
//! IP = 0, i.e. physical address V << 12. The trampoline is copied to
//! 0x8000 (V = 8). It loads the BSP's GDT, enters 32-bit protected mode,
//! enables PAE, loads the BSP's CR3 (patched into the copy), sets EFER.LME
//! and paging, and far-jumps to `ap_long_entry` in the image. There each
//! AP atomically takes a stack slot and calls [`ap_main`].
//!
//! xAPIC ICR (see `lapic.rs`): destination APIC ID in bits 31:24 of the
//! high word; writing the low word sends; bit 12 = delivery pending. ICR low 0x4500 = INIT, level
//! assert; 0x4600 | V = Start-up IPI with vector V.

use core::arch::global_asm;
use core::ptr::addr_of;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::boot::{SEL_CODE32, SEL_CODE64, SEL_DATA};
use crate::interrupts;
use crate::mptable::{self, MAX_CPUS};
use crate::pic_pit::Stopwatch;
use crate::{io, lapic};

const ICR_INIT_ASSERT: u32 = 0x4500;
const ICR_STARTUP: u32 = 0x4600;
const ICR_PENDING: u32 = 1 << 12;

/// Physical address the trampoline is copied to (page-aligned, < 1 MiB).
const TRAMPOLINE_BASE: u64 = 0x8000;
const AP_STACK_SIZE: usize = 16 * 1024;
const MAX_APS: usize = MAX_CPUS - 1;
/// How long the BSP waits for all APs to check in.
const AP_WAIT_US: u64 = 2_000_000;

/// Next free AP stack slot; taken with `lock xadd` by `ap_long_entry`.
#[no_mangle]
static AP_NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
/// APs that reached `ap_main` and printed their line.
static AP_STARTED: AtomicU32 = AtomicU32::new(0);

global_asm!(
    r#"
    /* ---- real-mode trampoline (copied to {base}, runs there) ---- */
    .pushsection .text.trampoline, "ax"
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_trampoline_gdtr - ap_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl ${code32}, ${base} + ap_trampoline_pm32 - ap_trampoline_start

    .code32
ap_trampoline_pm32:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov {base} + ap_trampoline_cr3 - ap_trampoline_start, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp ${code64}, $ap_long_entry

    .balign 8
ap_trampoline_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .balign 4
    .global ap_trampoline_cr3
ap_trampoline_cr3:
    .long 0
    .global ap_trampoline_end
ap_trampoline_end:
    .code64
    .popsection

    /* ---- AP stacks ---- */
    .pushsection .stacks, "aw", @nobits
    .balign 4096
ap_stacks:
    .skip {stack_size} * {max_aps}
    .popsection

    /* ---- 64-bit AP entry: pick a stack slot, call ap_main(slot) ---- */
    .pushsection .text.ap_entry, "ax"
    .global ap_long_entry
ap_long_entry:
    mov ${data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %eax
    lock xadd %eax, AP_NEXT_SLOT(%rip)
    cmp ${max_aps}, %eax
    jae 2f
    lea 1(%rax), %rcx
    imul ${stack_size}, %rcx, %rcx
    lea ap_stacks(%rip), %rsp
    add %rcx, %rsp
    mov %eax, %edi
    call ap_main
2:
    cli
    hlt
    jmp 2b
    .popsection
"#,
    base = const TRAMPOLINE_BASE,
    code64 = const SEL_CODE64,
    code32 = const SEL_CODE32,
    data = const SEL_DATA,
    stack_size = const AP_STACK_SIZE,
    max_aps = const MAX_APS,
    options(att_syntax)
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_cr3: u8;
    static ap_trampoline_end: u8;
}

fn send_ipi(apic_id: u8, low: u32) {
    lapic::write(lapic::ICR_HIGH, u32::from(apic_id) << 24);
    lapic::write(lapic::ICR_LOW, low);
    for _ in 0..1000 {
        if lapic::read(lapic::ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// Copies the trampoline to 0x8000 and patches in the BSP's CR3.
fn install_trampoline() {
    let start = addr_of!(ap_trampoline_start);
    // SAFETY: the three symbols delimit one contiguous asm blob in `.text`.
    let (len, cr3_off) = unsafe {
        (
            addr_of!(ap_trampoline_end).offset_from(start) as usize,
            addr_of!(ap_trampoline_cr3).offset_from(start) as usize,
        )
    };
    let dst = TRAMPOLINE_BASE as *mut u8;
    // SAFETY: 0x8000.. (one page) is conventional RAM below 1 MiB that the
    // guest owns: boot data (start info, command line, memory map) has been
    // copied out already, and no Rust object lives there. The source is the
    // trampoline's bytes in the image; the ranges do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(start, dst, len);
        (dst.add(cr3_off) as *mut u32).write_unaligned(crate::boot::cr3() as u32);
    }
}

/// Starts every AP listed in the MP table and prints
/// `SMP OK cpus=<N> started=<M>` (M includes the BSP).
pub fn start_aps() {
    let cpus = mptable::cpu_count();
    let own = lapic::id();
    let targets = || (0..cpus).map(mptable::apic_id).filter(move |&id| id != own);
    let expected = targets().count() as u32;

    if expected > 0 {
        install_trampoline();
        AP_NEXT_SLOT.store(0, Ordering::SeqCst);
        AP_STARTED.store(0, Ordering::SeqCst);
        lapic::enable();

        let vector = (TRAMPOLINE_BASE >> 12) as u32;
        let mut clock = Stopwatch::start();
        for id in targets() {
            send_ipi(id, ICR_INIT_ASSERT);
        }
        clock.wait_until_us(10_000); // INIT settle time (MP spec: 10 ms)
        for id in targets() {
            send_ipi(id, ICR_STARTUP | vector);
        }
        clock.wait_until_us(10_200); // >= 200 µs between the SIPIs
        for id in targets() {
            // A CPU that already left wait-for-SIPI ignores the second one.
            send_ipi(id, ICR_STARTUP | vector);
        }
        while AP_STARTED.load(Ordering::SeqCst) < expected
            && clock.elapsed_us() < AP_WAIT_US
            && !clock.stuck()
        {
            core::hint::spin_loop();
        }
    }
    let started = AP_STARTED.load(Ordering::SeqCst) + 1;
    crate::println!("SMP OK cpus={} started={}", cpus, started);
}

/// First Rust code on an AP (called by `ap_long_entry` on its own stack).
#[no_mangle]
extern "C" fn ap_main(_slot: u32) -> ! {
    interrupts::load();
    crate::println!("AP {} up", lapic::id());
    AP_STARTED.fetch_add(1, Ordering::SeqCst);
    io::halt_forever()
}
