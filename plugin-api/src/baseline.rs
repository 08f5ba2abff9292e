//! The oldest declarations this plugin-api release still loads: a verbatim
//! copy of plugin-api 1.0.0's `abi.rs` (`tests/fixtures/plugin-api-1.0/`
//! holds the released sources; a test keeps the two identical).
//!
//! Why it exists: abi_stable checks a library's layout against the
//! *loader's* declarations, and the check is one-way: the loader may know
//! no more fields, trait methods or enum variants than the library. A
//! 1.1 core checking a 1.0 plugin against its own 1.1 declarations would
//! refuse it ("too many fields"). So the core checks every plugin against
//! this baseline, which every 1.x plugin satisfies, and then views the
//! module through the current declarations (`PrefixRef::cast`): members a
//! plugin lacks read as absent (root-module fields) or run their default
//! bodies (trait methods). The type names and the package are what the
//! check compares, not the module path, so these types stand in for the
//! current ones. A test checks that the baseline's layouts are a prefix of
//! the current ones (compatible one way, refused the other).
//!
//! Nothing here may change within plugin-api 1.x.

#![allow(missing_docs, dead_code)]

mod abi_1_0;

pub use abi_1_0::*;

#[cfg(test)]
mod tests {
    use abi_stable::{
        abi_stability::abi_checking::{check_layout_compatibility_with_globals, CheckingGlobals},
        StableAbi,
    };

    /// What the core relies on: every 1.x plugin satisfies the baseline
    /// check, and viewing it through the current declarations only appends.
    #[test]
    fn the_baseline_is_a_prefix_of_the_current_abi() {
        let baseline = <super::PluginModRef as StableAbi>::LAYOUT;
        let current = <crate::PluginModRef as StableAbi>::LAYOUT;
        // A fresh set of globals each time: abi_stable remembers prefix
        // types it has seen, which would mix the two directions.
        if let Err(e) = check_layout_compatibility_with_globals(baseline, current, &CheckingGlobals::new()) {
            panic!("the current ABI no longer extends the 1.0 baseline:\n{e}");
        }
        let reverse = check_layout_compatibility_with_globals(current, baseline, &CheckingGlobals::new());
        if crate::MEMBERS.is_empty() {
            assert!(reverse.is_ok(), "with no members added since 1.0 the two are the same");
        } else {
            assert!(
                reverse.is_err(),
                "members {:?} were added since 1.0, so a core checking a 1.0 plugin against the \
                 current declarations must fail: that is why the baseline exists",
                crate::MEMBERS
            );
        }
    }
}
