//! IDT, CPU exception reporting, the PIC interrupt stubs and the MSI-X
//! vectors of the virtio devices.
//!
//! 64-bit IDT gate (16 bytes): offset[15:0], code selector, IST, type
//! (0x8E = present, DPL 0, 64-bit interrupt gate, i.e. IF cleared on
//! entry), offset[31:16], offset[63:32], reserved. Exceptions 8, 10-14, 17,
//! 21, 29 and 30 push an error code; the stubs push 0 for the others so
//! the common path sees the same frame. Every CPU runs in ring 0 with
//! IST 0, so no TSS is needed.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU64;

use crate::boot::SEL_CODE64;
use crate::pic_pit::IRQ_BASE;
use crate::serial;
use crate::{io, lapic};

/// Exit status written to the debug-exit port after a CPU exception.
pub const EXCEPTION_EXIT_CODE: u8 = 0x7F;
/// LAPIC spurious-interrupt vector (programmed into the SVR by `smp`).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// First MSI-X vector: 0x40 blk, 0x41 net RX, 0x42 net TX, 0x43 rng.
pub const MSIX_VECTOR_BASE: u8 = 0x40;
pub const MSIX_VECTORS: usize = 5;

/// Interrupts taken per MSI-X vector (index = vector - 0x40), counted by
/// the `msix_stub_<i>` handlers.
#[no_mangle]
pub static MSIX_IRQS: [AtomicU64; MSIX_VECTORS] = [const { AtomicU64::new(0) }; MSIX_VECTORS];

global_asm!(
    r#"
    .pushsection .text.isr, "ax"

    .macro EXC_NOERR n
    .balign 16
exc_stub_\n:
    push $0
    push $\n
    jmp exc_common
    .endm

    .macro EXC_ERR n
    .balign 16
exc_stub_\n:
    push $\n
    jmp exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR   8
    EXC_NOERR 9
    EXC_ERR   10
    EXC_ERR   11
    EXC_ERR   12
    EXC_ERR   13
    EXC_ERR   14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR   17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR   21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR   29
    EXC_ERR   30
    EXC_NOERR 31

    /* Frame: [rsp] vector, [rsp+8] error code, [rsp+16] RIP, CS, RFLAGS,
       RSP, SS. Never returns. */
exc_common:
    mov (%rsp), %rdi
    mov 8(%rsp), %rsi
    mov 16(%rsp), %rdx
    and $-16, %rsp
    call exception_handler
1:
    cli
    hlt
    jmp 1b

    /* IRQ0 (PIT): count the tick, EOI the master PIC. */
    .balign 16
    .global irq0_stub
irq0_stub:
    push %rax
    lock incq TICK_IRQS(%rip)
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq

    /* Other master IRQs (masked; only here for robustness): EOI master. */
    .balign 16
    .global irq_master_stub
irq_master_stub:
    push %rax
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq

    /* Slave IRQs: EOI slave then master. */
    .balign 16
    .global irq_slave_stub
irq_slave_stub:
    push %rax
    mov $0x20, %al
    out %al, $0xA0
    out %al, $0x20
    pop %rax
    iretq

    /* MSI-X vectors: count, then EOI the LAPIC (fixed, edge-triggered
       interrupts end with a write of 0 to its EOI register). `mov` to
       %eax zero-extends, so the LAPIC address stays below 4 GiB. */
    .macro MSIX_STUB i
    .balign 16
    .global msix_stub_\i
msix_stub_\i:
    push %rax
    lock incq MSIX_IRQS+8*\i(%rip)
    mov ${lapic_eoi}, %eax
    movl $0, (%rax)
    pop %rax
    iretq
    .endm

    MSIX_STUB 0
    MSIX_STUB 1
    MSIX_STUB 2
    MSIX_STUB 3
    MSIX_STUB 4

    /* Spurious IRQ7/IRQ15 and the LAPIC spurious vector: no EOI. */
    .balign 16
    .global irq_spurious_stub
irq_spurious_stub:
    iretq

    .popsection

    .pushsection .rodata.exc_stubs, "a"
    .balign 8
    .global EXC_STUBS
EXC_STUBS:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr
    .popsection
"#,
    lapic_eoi = const lapic::BASE + lapic::EOI,
    options(att_syntax)
);

extern "C" {
    static EXC_STUBS: [u64; 32];
    fn irq0_stub();
    fn irq_master_stub();
    fn irq_slave_stub();
    fn irq_spurious_stub();
    fn msix_stub_0();
    fn msix_stub_1();
    fn msix_stub_2();
    fn msix_stub_3();
    fn msix_stub_4();
}

/// An asm interrupt entry point (never called from Rust).
type Stub = unsafe extern "C" fn();

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 512]>);

// SAFETY: the IDT is written only by the BSP in `init`, before interrupts
// are enabled and before any AP runs; afterwards it is only read (by the
// CPUs' interrupt logic).
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

/// Builds the two quadwords of a 64-bit interrupt gate.
fn gate(handler: u64) -> (u64, u64) {
    let low =
        (handler & 0xFFFF) | u64::from(SEL_CODE64) << 16 | 0x8E << 40 | ((handler >> 16) & 0xFFFF) << 48;
    (low, handler >> 32)
}

/// Fills the IDT (exceptions 0-31, PIC vectors 0x20-0x2F, MSI-X vectors
/// 0x40-0x43, LAPIC spurious vector) and loads it on the BSP.
pub fn init() {
    let idt = IDT.0.get() as *mut u64;
    let set = |vector: u8, handler: u64| {
        let (low, high) = gate(handler);
        // SAFETY: vector < 256, so both writes are inside the 512-entry
        // array; no CPU uses the IDT yet (see `Sync` impl above).
        unsafe {
            idt.add(usize::from(vector) * 2).write(low);
            idt.add(usize::from(vector) * 2 + 1).write(high);
        }
    };
    // SAFETY: EXC_STUBS is an immutable table emitted by the asm above.
    let stubs = unsafe { &EXC_STUBS };
    for (vector, &stub) in stubs.iter().enumerate() {
        set(vector as u8, stub);
    }
    for irq in 0..16u8 {
        let handler: Stub = match irq {
            0 => irq0_stub,
            7 | 15 => irq_spurious_stub,
            1..=6 => irq_master_stub,
            _ => irq_slave_stub,
        };
        set(IRQ_BASE + irq, handler as usize as u64);
    }
    let msix: [Stub; MSIX_VECTORS] = [msix_stub_0, msix_stub_1, msix_stub_2, msix_stub_3, msix_stub_4];
    for (i, handler) in msix.into_iter().enumerate() {
        set(MSIX_VECTOR_BASE + i as u8, handler as usize as u64);
    }
    set(SPURIOUS_VECTOR, irq_spurious_stub as Stub as usize as u64);
    load();
}

/// Loads the (already built) IDT on the calling CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Dtr {
        limit: u16,
        base: u64,
    }
    let dtr = Dtr { limit: 256 * 16 - 1, base: IDT.0.get() as u64 };
    // SAFETY: the IDT is fully initialised by `init` and lives forever.
    unsafe { asm!("lidt [{}]", in(reg) &dtr, options(readonly, nostack, preserves_flags)) };
}

/// Common Rust part of every CPU exception: report and end the VM.
#[no_mangle]
extern "C" fn exception_handler(vector: u64, error: u64, rip: u64) -> ! {
    // No lock: the faulting CPU may hold the serial lock already.
    serial::print_line_unlocked(format_args!(
        "GUEST EXCEPTION vec={} rip=0x{:x} err=0x{:x}",
        vector, rip, error
    ));
    if vector == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 (page-fault address) has no side effects.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        serial::print_line_unlocked(format_args!("GUEST: cr2=0x{:x}", cr2));
    }
    io::debug_exit(EXCEPTION_EXIT_CODE);
    io::halt_forever()
}
