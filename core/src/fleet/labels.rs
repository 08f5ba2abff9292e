//! One host's facts as node labels (`ferry plugins --labels`), in
//! node-feature-discovery's local-source format: one `name=value` per
//! line, every name under the `ferry.dev/` prefix, each within Kubernetes'
//! label syntax ([`check`]). A scheduler selects nodes for a guest with
//! them: the machine types the host runs, its plugins and the state
//! versions they load and write, its CPU vendor, the CPU models it runs,
//! its TSC.
//!
//! Names are stable: a machine type, plugin or model name keeps its
//! letters, digits, `-`, `_` and `.`; any other character becomes `_`
//! (`x86-64-v1@1` is `cpu.model.x86-64-v1_1`).

use crate::{
    cpu::models::common_models,
    machine::MachineType,
    migration::plan::{vm_manifest_on, HostManifest},
};

/// Every label's prefix.
pub const PREFIX: &str = "ferry.dev/";

/// The label lines for a host with `manifest`, given the machine types
/// it might run.
pub fn labels(manifest: &HostManifest, machines: &[MachineType]) -> Vec<String> {
    let mut out = vec![label("ferry", &manifest.ferry_version), label("plugin-api", &manifest.plugin_api)];
    for m in machines {
        let (cpus, memory) = (m.cpus.unwrap_or(1), m.memory.unwrap_or(crate::vm::DEFAULT_MEMORY));
        if vm_manifest_on(m, manifest, cpus, memory).is_ok() {
            out.push(label(&format!("machine.{}", m.name), "true"));
        }
    }
    for p in &manifest.plugins {
        out.push(label(&format!("plugin.{}", p.name), &p.version));
        // The state versions it loads (upgrading the older ones) and
        // writes (downgrading to the older ones), oldest-newest.
        out.push(label(&format!("plugin.{}.loads", p.name), &format!("{}-{}", p.oldest_load, p.current)));
        out.push(label(&format!("plugin.{}.writes", p.name), &format!("{}-{}", p.oldest_save, p.current)));
    }
    if let Some(cpu) = &manifest.cpu {
        out.push(label("cpu.vendor", &cpu.vendor));
        for model in common_models(&[("this host".into(), cpu.clone())]).portable {
            out.push(label(&format!("cpu.model.{model}"), "true"));
        }
        out.push(label("tsc.khz", &cpu.tsc_khz.map(|k| k.to_string()).unwrap_or_default()));
        out.push(label("tsc.scaling", if cpu.tsc_scaling { "true" } else { "false" }));
    }
    out
}

/// `ferry.dev/NAME=VALUE`, each part made to fit the label syntax.
fn label(name: &str, value: &str) -> String {
    format!("{PREFIX}{}={}", fit(name), fit(value))
}

/// Keep letters, digits, `-`, `_`, `.`; anything else becomes `_`; at most
/// 63 characters, starting and ending with a letter or digit.
fn fit(s: &str) -> String {
    let kept: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .take(63)
        .collect();
    kept.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string()
}

/// Why a label line breaks NFD's local-source format or Kubernetes' label
/// syntax (a prefix that is a DNS subdomain of at most 253 characters, a
/// name and a value of at most 63 characters of letters, digits, `-`, `_`,
/// `.`, beginning and ending with a letter or digit; the value may be
/// empty), or None if it keeps them.
pub fn check(line: &str) -> Option<String> {
    let Some((key, value)) = line.split_once('=') else { return Some(format!("{line:?}: no '='")) };
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.len() > 253 || !p.split('.').all(label_ok) {
            return Some(format!("{line:?}: prefix {p:?} is not a DNS subdomain"));
        }
    }
    let part_ok = |s: &str, empty_ok: bool| {
        if s.is_empty() {
            return empty_ok;
        }
        s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if !part_ok(name, false) {
        return Some(format!("{line:?}: name {name:?} breaks the label syntax"));
    }
    if !part_ok(value, true) {
        return Some(format!("{line:?}: value {value:?} breaks the label syntax"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::plan::HostPlugin;

    #[test]
    fn the_check_follows_kubernetes_label_rules() {
        for good in [
            "ferry.dev/machine.pc-2=true",
            "ferry.dev/tsc.khz=",
            "example.com/a_b.c-d=X9",
            "plain=1",
            &format!("ferry.dev/{}={}", "n".repeat(63), "v".repeat(63)),
        ] {
            assert_eq!(check(good), None, "{good}");
        }
        for bad in [
            "ferry.dev/cpu.model.x86-64-v1@1=true",
            "ferry.dev/-starts=1",
            "ferry.dev/ends.=1",
            "Ferry.Dev/x=1",
            "ferry.dev/x=ends-",
            "ferry.dev/x=has space",
            "no-equals",
            &format!("ferry.dev/{}=1", "n".repeat(64)),
            &format!("ferry.dev/x={}", "v".repeat(64)),
            "ferry..dev/x=1",
        ] {
            assert!(check(bad).is_some(), "{bad} passed");
        }
    }

    #[test]
    fn names_from_plugins_and_versions_are_made_to_fit() {
        assert_eq!(fit("x86-64-v1@1"), "x86-64-v1_1");
        assert_eq!(fit("@odd name!"), "odd_name");
        assert_eq!(fit(&"a".repeat(80)).len(), 63);
        let host = HostManifest {
            ferry_version: "0.1.0+build/7".into(),
            plugin_api: "1.2".into(),
            plugins: vec![HostPlugin {
                name: "vendor/odd plugin".into(),
                version: "2.0.0-rc.1".into(),
                current: 3,
                oldest_load: 1,
                oldest_save: 2,
                properties: vec![],
                defaults: Default::default(),
            }],
            cpu: None,
        };
        let lines = labels(&host, &[]);
        for l in &lines {
            assert_eq!(check(l), None, "{l}");
        }
        assert!(lines.contains(&"ferry.dev/plugin.vendor_odd_plugin.loads=1-3".to_string()), "{lines:?}");
        assert!(lines.contains(&"ferry.dev/plugin.vendor_odd_plugin.writes=2-3".to_string()), "{lines:?}");
        assert!(lines.contains(&"ferry.dev/ferry=0.1.0_build_7".to_string()), "{lines:?}");
    }
}
