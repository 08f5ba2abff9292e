//! vhost-user backends in an offline plan (`ferry compat --guest
//! SNAPSHOT --backend ID=PROBE.json`): each device whose manifest carries
//! a vhost-user contract is checked against the identity `ferry vhost-user
//! probe --json` read from the destination's backend, by the same function
//! the destination's plugin runs before a live migration's pause.

use std::collections::BTreeMap;

use ferry_vhost_user::{contract::Contract, BackendIdentity};

use super::{manifest::Manifest, plan::Plan};

/// Check every vhost-user device of `manifest` against `backends` (by
/// device id; `shown` names each probe file in the verdict), refusing in
/// `plan` what its backend cannot take. Returns a note per vhost-user
/// device no backend was given for.
pub fn check(
    plan: &mut Plan,
    manifest: &Manifest,
    backends: &BTreeMap<String, (String, BackendIdentity)>,
) -> Vec<String> {
    let mut notes = Vec::new();
    for d in manifest.devices.iter().filter(|d| d.contract.contains_key("vhost-user.device")) {
        let verdict = match (Contract::from_facts(&d.contract), backends.get(&d.id)) {
            (Err(e), _) => Some(e),
            (Ok(_), None) => {
                notes.push(format!(
                    "device {}: its vhost-user backend was not checked (give --backend {}=PROBE.json, \
                     from `ferry vhost-user probe SOCKET --device DEVICE --json` on the destination)",
                    d.id, d.id
                ));
                None
            }
            (Ok(c), Some((shown, identity))) => c.check(identity, shown).err(),
        };
        if let Some(reason) = verdict {
            plan.refuse(&d.id, reason);
        }
    }
    notes
}
