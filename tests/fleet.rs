//! A rollout and a rollback with the guests running: three hosts (network
//! namespaces on one bridge) start on three release sets, R1 (testdev 1,
//! serial-16550 0.1, virtio-blk 0.1), R2 and R3 (`ferry_tests::fleet`);
//! five test guests write and verify their disks, re-verify their memory
//! and device registers and send frames on their taps, one of them with
//! testdev's turbo on (which no R1 host can express). The driver upgrades
//! A and B to R3 (C runs it already), then rolls each back to its first
//! release set: drain the host (each guest to the emptiest host that
//! takes it), change its plugin directory, refill it. Every move goes over
//! mutual TLS with this host's bindings (disk and tap) and prints its plan;
//! a move the plan refuses is refused before the pause, the guest runs on
//! where it was, and the driver takes another. At the end every guest's
//! checks held on every host it ran on.

use ferry_tests::{
    fleet::{check_guest, release_sets, Fleet},
    kvm_or_skip,
};

#[test]
fn a_fleet_rolls_out_and_back_with_its_guests_running() {
    if !kvm_or_skip("a_fleet_rolls_out_and_back_with_its_guests_running") {
        return;
    }
    let Some(mut fleet) = Fleet::new([0, 1, 2], 5) else { return };
    for (host, turbo) in [(0, false), (0, false), (1, false), (1, false), (2, true)] {
        fleet.boot(host, turbo);
    }
    let started = std::time::Instant::now();
    println!("rollout: every host to R3");
    for h in [0, 1] {
        assert!(fleet.roll(h, 2), "host {h} upgrades");
    }
    assert_eq!(fleet.release, [2, 2, 2]);
    println!("rollback: every host to its first release set");
    for (h, r) in [(1, 1), (0, 0)] {
        assert!(fleet.roll(h, r), "host {h} rolls back");
    }
    assert_eq!(fleet.release, [0, 1, 2], "each host runs its first release set again");
    let took = started.elapsed();
    let turbo = fleet.guests.iter().position(|g| g.turbo).expect("a turbo guest");
    assert_ne!(fleet.guests[turbo].host, 0, "the turbo guest is not on an R1 host");
    assert!(!fleet.refusals.is_empty(), "the driver met a refusal (the turbo guest to an R1 host)");
    for r in &fleet.refusals {
        assert_eq!(r.guest, fleet.guests[turbo].name, "only the turbo guest is refused: {r:?}");
        assert!(
            r.plan.iter().any(|l| l.contains("device dev0") && l.contains("guest enabled turbo")),
            "the refusal names the device and why: {r:?}"
        );
    }
    let (moves, refusals) = (fleet.moves.len(), fleet.refusals.len());
    let (p50, p99) = (fleet.downtime(0.5), fleet.downtime(0.99));
    let sets: Vec<&str> = fleet.release.iter().map(|&r| release_sets()[r].name).collect();
    for (name, console) in fleet.finish() {
        let phases = check_guest(&name, &console).unwrap_or_else(|e| panic!("{e}"));
        println!("{name}: every check held in {phases} phases");
    }
    println!(
        "fleet: {moves} moves and {refusals} refusal(s) in {:.1} s; downtime p50 {p50:.1} ms, p99 {p99:.1} ms; hosts back on {}",
        took.as_secs_f64(),
        sets.join(", ")
    );
}
