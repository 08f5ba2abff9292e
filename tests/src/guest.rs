//! What the test guest says and how tests drive it: ticks, console lines
//! split where a guest paused, a guest with an API socket, this host's
//! CPU.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::process::{ferry_bin, spawn_ferry_env, wait_for_path, Running};

/// How long a test waits for what a guest does (a line, a tick, an
/// API socket): long enough for a loaded machine, short enough to fail.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The test guest's next tick (`ticks=N` on its command line).
pub fn wait_tick(vm: &mut Running) -> u64 {
    vm.wait_line("TICK", DEADLINE).and_then(|l| tick_number(&l)).expect("the guest ticks")
}

/// `ferry run --api-socket DIR/NAME.sock ARGS...` with `env`; returns it
/// once its API socket answers, and the socket.
pub fn start_with_api(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> (Running, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let s = socket.display().to_string();
    let mut all = vec!["run", "--api-socket", &s];
    all.extend_from_slice(args);
    let vm = Running::new(spawn_ferry_env(&all, env));
    assert!(wait_for_path(&socket, DEADLINE), "no API socket for {name}");
    (vm, socket)
}

/// This host's CPU, as `ferry plugins --manifest` describes it.
pub fn host_cpu() -> &'static ferry::cpu::HostCpu {
    static HOST: std::sync::OnceLock<ferry::cpu::HostCpu> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let out = Command::new(ferry_bin()).args(["plugins", "--manifest"]).output().expect("ferry plugins");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let m: ferry::migration::plan::HostManifest =
            serde_json::from_slice(&out.stdout).expect("a host manifest");
        m.cpu.expect("this host's manifest describes its CPU")
    })
}

/// The number in a `TICK <n>` line.
pub fn tick_number(line: &str) -> Option<u64> {
    line.strip_prefix("TICK ").and_then(|n| n.trim().parse().ok())
}

/// Lines starting with `prefix` on the console of the host a guest left
/// (`before`) and of the host it moved to (`after`). A line the guest was
/// printing when it paused (its start before, the rest after) counts once,
/// for `before`: the guest began it there, after doing what it reports.
pub fn count_across_move(before: &str, after: &str, prefix: &str) -> (usize, usize) {
    let count = |out: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
    let tail = before.trim_end_matches('\n').rsplit('\n').next().unwrap_or("");
    let head = after.lines().next().unwrap_or("");
    let split = !tail.is_empty() && !tail.starts_with(prefix) && format!("{tail}{head}").starts_with(prefix);
    (count(before) + usize::from(split), count(after))
}

/// The guest's tick counter carries on from console `before` (the process
/// that paused, snapshotted or moved it) to console `after` (the one that
/// resumed it): `after`'s first TICK follows `before`'s last, or the line
/// between them was split where the guest was paused, mid-line (its start
/// printed before, the rest after). Returns `after`'s first tick.
pub fn ticks_carry_on(before: &str, after: &str) -> Result<u64, String> {
    let last = before.lines().filter_map(tick_number).max().ok_or("no TICK before")?;
    let first = after.lines().find_map(tick_number).ok_or("no TICK after")?;
    if first == last + 1 {
        return Ok(first);
    }
    let tail = before.lines().rev().find(|l| !l.is_empty()).unwrap_or("");
    let head = after.lines().next().unwrap_or("");
    if first == last + 2 && format!("{tail}{head}") == format!("TICK {}", last + 1) {
        return Ok(first);
    }
    Err(format!(
        "the counter goes from {last} to {first} (last line before: `{tail}`, first after: `{head}`)"
    ))
}

/// The test guest's blk-write pattern for one sector: 8-byte words, the
/// word at byte offset `o` of sector `s` is
/// `(s << 32) ^ o ^ (seed * 0x9E3779B97F4A7C15)`.
pub fn blk_pattern_sector(sector: u64, seed: u64) -> Vec<u8> {
    (0..64u64)
        .flat_map(|w| ((sector << 32) ^ (w * 8) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes())
        .collect()
}

/// FNV-1a over `bytes`, as the test guest prints it for what it read.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::{count_across_move, ticks_carry_on};

    #[test]
    fn a_line_split_at_the_pause_counts_once_where_it_began() {
        assert_eq!(count_across_move("NET SENT 1 a\n", "NET SENT 1 b\n", "NET SENT 1 "), (1, 1));
        assert_eq!(count_across_move("NET SENT 1 a\nNET S", "ENT 1 b\nTICK 2\n", "NET SENT 1 "), (2, 0));
        assert_eq!(count_across_move("NET SENT 1 a\nNET S\n", "ENT 1 b\n", "NET SENT 1 "), (2, 0));
        assert_eq!(count_across_move("TICK 1\n", "NET SENT 1 b\n", "NET SENT 1 "), (0, 1));
        assert_eq!(count_across_move("NET SENT 1 ", "b\n", "NET SENT 1 "), (1, 0));
    }

    #[test]
    fn ticks_carry_on_across_a_line_split_at_the_pause() {
        assert_eq!(ticks_carry_on("TICK 2\nTICK 3\n", "TICK 4\n"), Ok(4));
        assert_eq!(ticks_carry_on("TICK 3\nTIC\n", "K 4\nTICK 5\n"), Ok(5));
        assert!(ticks_carry_on("TICK 3\n", "TICK 5\n").is_err(), "a lost tick");
        assert!(ticks_carry_on("TICK 3\nTIC\n", "TICK 5\n").is_err(), "a lost tick after a partial line");
        assert!(ticks_carry_on("TICK 3\n", "TICK 3\n").is_err(), "a repeated tick");
    }
}
