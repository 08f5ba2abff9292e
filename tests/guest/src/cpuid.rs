//! `cpuid=<leaf>`: what the CPUID instruction answers inside the guest.

/// Run CPUID for `leaf` (subleaf 0); prints
/// `CPUID leaf=0x<l> eax=0x.. ebx=0x.. ecx=0x.. edx=0x..`.
pub fn report(leaf: u32) {
    // SAFETY: CPUID only reads processor identification; every x86-64 CPU
    // has it.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, 0) };
    crate::println!("CPUID leaf={:#010x} eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}", leaf, r.eax, r.ebx, r.ecx, r.edx);
}
