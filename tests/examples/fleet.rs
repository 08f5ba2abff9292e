//! A rollout and a rollback to watch: three hosts (network namespaces on
//! one bridge) on three release sets, five test guests doing disk, network
//! and device I/O, one with testdev's turbo on. The driver upgrades every
//! host to the newest release set, one host at a time (drain, change the
//! plugin directory, refill), then rolls each back to its first set. Each
//! move prints its plan; the move the plan refuses (the turbo guest to a
//! host whose testdev cannot express turbo) is refused before the guest
//! pauses and another guest goes instead. `tests/fleet.rs` runs the same
//! with assertions.
//!
//! Run as root on a host with /dev/kvm:
//! `cargo run -p ferry-tests --example fleet` (`FERRY_FLEET_PACE_MS`: a
//! pause after each move, default 500).

use std::time::Duration;

use ferry_tests::fleet::{check_guest, release_sets, Fleet};

fn main() {
    if !ferry_tests::kvm_or_skip("the fleet example") {
        std::process::exit(1);
    }
    let Some(mut fleet) = Fleet::new([0, 1, 2], 5) else { std::process::exit(1) };
    let pace = std::env::var("FERRY_FLEET_PACE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    fleet.pace = Duration::from_millis(pace);
    for (i, set) in release_sets().iter().enumerate() {
        println!("release set {}: {} (host {})", set.name, set.holds, ["A", "B", "C"][i]);
    }
    for (host, turbo) in [(0, false), (0, false), (1, false), (1, false), (2, true)] {
        fleet.boot(host, turbo);
    }
    let started = std::time::Instant::now();
    println!("\n== rollout: every host to R3");
    for h in [0, 1] {
        fleet.roll(h, 2);
    }
    println!("\n== rollback: every host to its first release set");
    for (h, r) in [(1, 1), (0, 0)] {
        fleet.roll(h, r);
    }
    let took = started.elapsed();
    let (moves, refusals) = (fleet.moves.len(), fleet.refusals.len());
    let (p50, p99) = (fleet.downtime(0.5), fleet.downtime(0.99));
    let hosts: Vec<String> = (0..3).map(|h| fleet.host_name(h)).collect();
    println!("\n== the guests");
    let mut lost = false;
    for (name, console) in fleet.finish() {
        match check_guest(&name, &console) {
            Ok(phases) => {
                println!("{name}: disk, memory, device registers and frames checked in {phases} phases")
            }
            Err(e) => {
                println!("{e}");
                lost = true;
            }
        }
    }
    println!(
        "\n{moves} moves and {refusals} refusal(s) in {:.1} s (with {pace} ms pauses); downtime p50 {p50:.1} ms, p99 {p99:.1} ms; hosts: {}",
        took.as_secs_f64(),
        hosts.join(", ")
    );
    if lost {
        std::process::exit(1);
    }
}
