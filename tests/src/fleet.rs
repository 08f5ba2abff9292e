//! A fleet for rollout runs (`tests/fleet.rs`, `examples/fleet.rs`): hosts
//! that are network namespaces on one bridge ([`Lan`]), each running its
//! ferry processes on the plugin directory of its release set, test
//! guests doing disk, network and device I/O on them, and a driver that
//! drains a host, changes its release set and refills it, one host at a
//! time, moving guests live over mutual TLS. A move the plan refuses is
//! refused at the handshake, before the guest pauses (the source runs on),
//! and the driver places the guest elsewhere.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{
    ferry_bin, fixture_plugin_with, migrate, netns::Lan, plugin_dir_copy, wait_for_path, Running, TempDir,
    DEADLINE,
};

/// A set of plugin releases a host runs: the workspace's plugins with some
/// replaced by other releases.
pub struct ReleaseSet {
    /// Its name in the output ("R1").
    pub name: &'static str,
    /// What it holds, for people.
    pub holds: &'static str,
    /// The plugin directory.
    pub plugins: TempDir,
}

/// The three release sets: R1 (testdev 1, serial-16550 0.1, virtio-blk
/// 0.1), R2 (testdev 2, serial-16550 0.2, virtio-blk 0.2), R3 (testdev 3,
/// and the same serial and disk). Built once per process.
pub fn release_sets() -> &'static [ReleaseSet; 3] {
    static SETS: OnceLock<[ReleaseSet; 3]> = OnceLock::new();
    SETS.get_or_init(|| {
        let make = |name: &'static str, holds: &'static str, testdev: u32, previous: bool| {
            let dir = plugin_dir_copy(&format!("fleet-{name}"));
            let lib = fixture_plugin_with("testdev", &[&format!("v{testdev}")]);
            std::fs::copy(lib, dir.path().join("libtestdev.so")).expect("install testdev");
            if previous {
                for (plugin, lib) in
                    [("serial-16550", "libserial_16550.so"), ("virtio-blk", "libvirtio_blk.so")]
                {
                    let built = crate::workspace_plugin_release(plugin, &["previous-release"]);
                    std::fs::copy(built, dir.path().join(lib)).expect("install the previous release");
                }
            }
            ReleaseSet { name, holds, plugins: dir }
        };
        [
            make("R1", "testdev 1.0, serial-16550 0.1, virtio-blk 0.1", 1, true),
            make("R2", "testdev 2.0, serial-16550 0.2, virtio-blk 0.2", 2, false),
            make("R3", "testdev 3.0, serial-16550 0.2, virtio-blk 0.2", 3, false),
        ]
    })
}

/// How many checking phases (half a second each) a guest's command line
/// holds (the test guest's command line is at most 4 KiB); after them it
/// ticks and checks its memory every second until it is shut down.
const PHASES: usize = 36;

/// A guest of the fleet.
pub struct Guest {
    /// "g0".
    pub name: String,
    /// Whether its machine type switches testdev's turbo on (state v2 and
    /// later: a host of R1 cannot take it).
    pub turbo: bool,
    /// The host it runs on.
    pub host: usize,
    disk: PathBuf,
    tap: String,
    vm: Running,
    api: PathBuf,
    /// What its earlier hosts' consoles said.
    consoles: Vec<String>,
}

/// One move the driver made, or tried.
#[derive(Debug, Clone)]
pub struct Move {
    /// Guest name.
    pub guest: String,
    /// From and to host.
    pub from: usize,
    /// See `from`.
    pub to: usize,
    /// Downtime, for a move that happened.
    pub downtime_ms: Option<f64>,
    /// The plan's lines (or, for a refusal, the refusal).
    pub plan: Vec<String>,
}

/// The hosts, their release sets, and the guests on them.
pub struct Fleet {
    lan: Lan,
    dir: TempDir,
    /// Each host's release set (index into [`release_sets`]).
    pub release: Vec<usize>,
    /// The guests.
    pub guests: Vec<Guest>,
    /// Every move made.
    pub moves: Vec<Move>,
    /// Every move the plan refused before the pause.
    pub refusals: Vec<Move>,
    /// Print each step as it happens.
    pub verbose: bool,
    /// Wait this long after each move (for a person watching).
    pub pace: Duration,
    next_port: u16,
}

/// The machine types (`tests/machines/`): testdev-1 keeps the test device
/// at its v1 behaviour, testdev-2 switches turbo on.
fn machine(turbo: bool) -> String {
    let name = if turbo { "testdev-2.toml" } else { "testdev-1.toml" };
    crate::repo_root().join("tests/machines").join(name).display().to_string()
}

/// The guest's command line: device registers written once, then phases
/// that each write the disk, re-verify memory, disk and the registers, and
/// send a frame; then ticks (and memory checks) until it is shut down.
/// A turbo guest turns turbo on and checks it stays on.
fn cmdline(n: usize, turbo: bool) -> String {
    let v = 0x10 + n;
    let mut c = format!("dev-write=0:{v:#x} pattern=4 blk-write=0:8:{n} hz=100");
    let mut check = format!("dev-check=0:{v:#x}");
    if turbo {
        c += " dev-write=0x20:1";
        check += " dev-check=0x20:1";
    }
    for _ in 0..PHASES {
        c += &format!(
            " ticks=5 blk-write=8:8:{s} verify blk-verify=0:8:{n} blk-verify=8:8:{s} {check} net-send=1",
            s = n + 100
        );
    }
    c + " ticks=0"
}

impl Fleet {
    /// Three hosts on the release sets `release` (indexes into
    /// [`release_sets`]), taps for `guests` guests on each. None where
    /// namespaces cannot be made here (said loudly).
    pub fn new(release: [usize; 3], guests: usize) -> Option<Self> {
        let taps: Vec<String> = (0..guests).map(|i| format!("fgt{i}")).collect();
        let lan = Lan::new(3, &taps.iter().map(String::as_str).collect::<Vec<_>>())?;
        let dir = TempDir::new("fleet");
        let hosts: Vec<String> = (0..3).map(Lan::addr).collect();
        let mut init = Command::new(ferry_bin());
        init.args(["tls", "init"]).arg(dir.path().join("tls"));
        for h in &hosts {
            init.args(["--host", h]);
        }
        let out = init.output().expect("ferry tls init");
        assert!(out.status.success(), "ferry tls init: {}", String::from_utf8_lossy(&out.stderr));
        release_sets();
        Some(Fleet {
            lan,
            dir,
            release: release.to_vec(),
            guests: Vec::new(),
            moves: Vec::new(),
            refusals: Vec::new(),
            verbose: true,
            pace: Duration::ZERO,
            next_port: 7900,
        })
    }

    fn say(&self, line: &str) {
        if self.verbose {
            println!("{line}");
        }
    }

    /// Host `h` as people read it: "A (10.201.0.1, R2)".
    pub fn host_name(&self, h: usize) -> String {
        format!("{} ({}, {})", ["A", "B", "C"][h], Lan::addr(h), release_sets()[self.release[h]].name)
    }

    fn tls(&self, h: usize) -> String {
        self.dir.path().join("tls").join(Lan::addr(h)).display().to_string()
    }

    fn plugins(&self, h: usize) -> &Path {
        release_sets()[self.release[h]].plugins.path()
    }

    /// Boot guest number `guests.len()` on host `h`.
    pub fn boot(&mut self, h: usize, turbo: bool) {
        let n = self.guests.len();
        let name = format!("g{n}");
        let disk = self.dir.path().join(format!("{name}.img"));
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
        let tap = format!("fgt{n}");
        let api = self.dir.path().join(format!("{name}-0.sock"));
        let (d, net, a) = (
            format!("path={}", disk.display()),
            format!("tap={tap},mac=52:54:00:f1:00:{n:02x}"),
            api.display().to_string(),
        );
        let m = machine(turbo);
        let args = [
            "--machine",
            &m,
            "--memory",
            "64M",
            "--disk",
            &d,
            "--net",
            &net,
            "--api-socket",
            &a,
            "--cmdline",
            &cmdline(n, turbo),
        ];
        let mut vm = Running::new(self.lan.hosts[h].spawn_ferry_on(self.plugins(h), &[], &args));
        assert!(wait_for_path(&api, DEADLINE), "{name}: no API socket");
        assert!(vm.wait_line("BLK VERIFY OK", DEADLINE).is_some(), "{name} runs on {}", self.host_name(h));
        self.say(&format!(
            "boot {name}{} on {}",
            if turbo { " (testdev turbo on)" } else { "" },
            self.host_name(h)
        ));
        self.guests.push(Guest { name, turbo, host: h, disk, tap, vm, api, consoles: Vec::new() });
    }

    /// Guests on host `h`, in order.
    pub fn on(&self, h: usize) -> Vec<usize> {
        (0..self.guests.len()).filter(|&g| self.guests[g].host == h).collect()
    }

    /// Move guest `g` to host `to`: Ok with the move, or Err with the
    /// refusal (the plan refused it before the pause: the guest runs on
    /// where it was, which is checked).
    pub fn try_move(&mut self, g: usize, to: usize) -> Result<Move, Move> {
        let from = self.guests[g].host;
        self.next_port += 1;
        let port = self.next_port;
        let uri = format!("tcp:{}:{port}", Lan::addr(to));
        let seq = self.moves.len() + self.refusals.len() + 1;
        let api = self.dir.path().join(format!("{}-{seq}.sock", self.guests[g].name));
        let guest = &self.guests[g];
        let (d, net, a, tls) = (
            format!("id=disk0,path={}", guest.disk.display()),
            format!("id=net0,tap={}", guest.tap),
            api.display().to_string(),
            self.tls(to),
        );
        let args = ["--incoming", &uri, "--tls-dir", &tls, "--disk", &d, "--net", &net, "--api-socket", &a];
        let dst = Running::new(self.lan.hosts[to].spawn_ferry_on(self.plugins(to), &[], &args));
        let deadline = Instant::now() + DEADLINE;
        while !self.lan.listening(to, port) {
            assert!(Instant::now() < deadline, "no destination listening on {uri}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (ok, text) = migrate(&guest.api, &uri, &["--tls-dir", &self.tls(from)]);
        // The plan's lines, once each (the report and the error both list them).
        let mut plan: Vec<String> = Vec::new();
        for l in text.lines().map(|l| l.trim().trim_matches(|c| c == '"' || c == ',')) {
            if (l.starts_with("device ") || l.starts_with("cpu:")) && !plan.iter().any(|p| p == l) {
                plan.push(l.to_string());
            }
        }
        let mut record = Move { guest: guest.name.clone(), from, to, downtime_ms: None, plan };
        if !ok {
            assert!(
                text.contains("REFUSED"),
                "{} -> {}: failed, not refused:\n{text}",
                guest.name,
                self.host_name(to)
            );
            let out = dst.finish(DEADLINE);
            assert_ne!(out.code(), 0, "the destination ends, refusing");
            let guest = &mut self.guests[g];
            assert!(guest.vm.alive(), "{}: the source runs on after a refusal", guest.name);
            let info = crate::ctl(&guest.api, &["info"]);
            assert!(info.contains("\"running\""), "{}: still running on its host:\n{info}", guest.name);
            record.plan.retain(|l| l.contains("REFUSED"));
            self.say(&format!(
                "  {} -> {}: refused before the pause: {}",
                record.guest,
                self.host_name(to),
                record.plan.join("; ")
            ));
            self.refusals.push(record.clone());
            return Err(record);
        }
        record.downtime_ms = crate::report_num(&text, "downtime_ms");
        let guest = &mut self.guests[g];
        let old = std::mem::replace(&mut guest.vm, dst);
        let out = old.finish(DEADLINE);
        assert_eq!(out.code(), 0, "{}: the source ends after the move: {}", guest.name, out.stderr);
        guest.consoles.push(out.stdout);
        (guest.host, guest.api) = (to, api);
        self.say(&format!(
            "  {} {} -> {}: downtime {:.1} ms; {}",
            record.guest,
            ["A", "B", "C"][from],
            self.host_name(to),
            record.downtime_ms.unwrap_or(f64::NAN),
            record.plan.join("; ")
        ));
        self.moves.push(record.clone());
        std::thread::sleep(self.pace);
        Ok(record)
    }

    /// Hosts other than `h`, fewest guests first (then by name).
    fn targets(&self, h: usize) -> Vec<usize> {
        let mut t: Vec<usize> = (0..3).filter(|&o| o != h).collect();
        t.sort_by_key(|&o| (self.on(o).len(), o));
        t
    }

    /// Move every guest off host `h`, each to the emptiest host that takes
    /// it. A guest no host takes stays (returned).
    pub fn drain(&mut self, h: usize) -> Vec<usize> {
        self.say(&format!("drain {}", self.host_name(h)));
        let mut stuck = Vec::new();
        for g in self.on(h) {
            if !self.targets(h).into_iter().any(|to| self.try_move(g, to).is_ok()) {
                stuck.push(g);
            }
        }
        stuck
    }

    /// Host `h` now runs release set `r` (its guests are elsewhere: ferry
    /// processes started there from now on load that plugin directory).
    pub fn set_release(&mut self, h: usize, r: usize) {
        let from = release_sets()[self.release[h]].name;
        self.release[h] = r;
        self.say(&format!(
            "{}: {from} -> {} ({})",
            self.host_name(h),
            release_sets()[r].name,
            release_sets()[r].holds
        ));
    }

    /// Move guests to host `h` until it holds its share (rounded up), from
    /// the fullest host first (the later host on a tie), its last guest
    /// first; a guest the plan refuses there stays where it is, and the
    /// next is tried.
    pub fn refill(&mut self, h: usize) {
        self.say(&format!("refill {}", self.host_name(h)));
        let share = self.guests.len().div_ceil(3);
        let mut tried = Vec::new();
        while self.on(h).len() < share {
            let mut sources: Vec<usize> = (0..3).filter(|&o| o != h && self.on(o).len() >= share).collect();
            sources.sort_by_key(|&o| (std::cmp::Reverse(self.on(o).len()), std::cmp::Reverse(o)));
            let next =
                sources.iter().flat_map(|&o| self.on(o).into_iter().rev()).find(|g| !tried.contains(g));
            let Some(g) = next else { break };
            tried.push(g);
            let _ = self.try_move(g, h);
        }
    }

    /// Upgrade or roll back host `h` to release set `r`: drain, change,
    /// refill. False (and `h` keeps its release set) when a guest could go
    /// nowhere else.
    pub fn roll(&mut self, h: usize, r: usize) -> bool {
        let stuck = self.drain(h);
        if !stuck.is_empty() {
            let names: Vec<&str> = stuck.iter().map(|&g| self.guests[g].name.as_str()).collect();
            self.say(&format!(
                "{} keeps its release set: {} can go nowhere else",
                self.host_name(h),
                names.join(", ")
            ));
            return false;
        }
        self.set_release(h, r);
        self.refill(h);
        true
    }

    /// Shut every guest down; per guest, everything its hosts' consoles
    /// said, in order, as one console.
    pub fn finish(mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for g in std::mem::take(&mut self.guests) {
            let mut g = g;
            // Alive on its last host (ticking, checking its memory every
            // second) before it ends.
            assert!(g.vm.wait_line("TICK", DEADLINE).is_some(), "{} runs on its last host", g.name);
            crate::ctl(&g.api, &["shutdown"]);
            let last = g.vm.finish(DEADLINE);
            g.consoles.push(last.stdout);
            // Joined as the guest wrote them: a line it was printing when
            // it paused goes on on the next host.
            out.push((g.name, g.consoles.concat()));
        }
        out
    }

    /// The downtime percentile `p` (0..1) over every move made.
    pub fn downtime(&self, p: f64) -> f64 {
        let mut d: Vec<f64> = self.moves.iter().filter_map(|m| m.downtime_ms).collect();
        if d.is_empty() {
            return f64::NAN;
        }
        d.sort_by(f64::total_cmp);
        d[((d.len() - 1) as f64 * p).round() as usize]
    }
}

/// What a guest's consoles must show after the run: no failed check, its
/// disk, memory and device registers verified and its frames sent in every
/// phase it reached.
pub fn check_guest(name: &str, console: &str) -> Result<usize, String> {
    for bad in ["BAD", "TIMEOUT", "unknown token"] {
        if let Some(line) = console.lines().find(|l| l.contains(bad)) {
            return Err(format!("{name}: {line}"));
        }
    }
    let count = |p: &str| console.lines().filter(|l| l.starts_with(p)).count();
    let phases = count("NET SENT");
    if phases == 0 {
        return Err(format!("{name}: no phase completed"));
    }
    for (what, want) in [("BLK VERIFY OK", 2 * phases), ("DEV OK", phases), ("PATTERN OK", phases)] {
        if count(what) < want {
            return Err(format!("{name}: {} `{what}` in {phases} phases", count(what)));
        }
    }
    Ok(phases)
}
