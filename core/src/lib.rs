//! Ferry's core: KVM, guest memory, vCPU threads, the address bus, boot,
//! the plugin loader and machine types. `main.rs` is the CLI on top.

pub mod api;
pub mod bindings;
pub mod boot;
pub mod bus;
pub mod cpu;
pub mod fdpass;
pub mod fleet;
pub mod host;
pub mod images;
pub mod interrupts;
pub mod isolate;
pub mod kvm;
pub mod log;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod pci;
pub mod plugins;
pub mod seccomp;
pub mod state;
pub mod uffd;
pub mod unix_socket;
pub mod vcpu;
pub mod vm;
pub mod vmcore;
