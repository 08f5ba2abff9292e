//! The command line's pieces below `main.rs` (which defines the
//! commands and dispatches them): `run.rs` (`ferry run`: boot, restore or
//! incoming, and its arguments), `ctl.rs` (`ferry ctl`: the control API
//! client, and a migration's progress), `hosts.rs` (what reads host
//! manifests: `ferry plugins`, `compat`, `fleet`, `machines`) and
//! `args.rs` (value parsers and the plugin directory, used by the others).

pub mod args;
pub mod ctl;
pub mod hosts;
pub mod run;
