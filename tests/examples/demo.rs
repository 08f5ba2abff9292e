//! Ferry's main job, on one machine: boot the bundled test guest on a
//! "new" host (this build's plugins with the testdev device at release 3),
//! migrate it live over TCP with mutual TLS (credentials from `ferry tls
//! init`) to a second ferry with an older plugin set (testdev release 1),
//! and show the plan, the downtime, and the guest's counter carrying on.
//! The README's first command runs this.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use ferry_tests::{
    bin_dir, ferry_bin, fixture_plugin_with, free_port, plugin_dir_copy, tick_number, wait_for_path, Running,
    TempDir,
};

const LONG: Duration = Duration::from_secs(120);

fn main() {
    let new = plugin_dir_copy("demo-new");
    let old = plugin_dir_copy("demo-old");
    std::fs::copy(fixture_plugin_with("testdev", &["v3"]), new.path().join("libtestdev.so"))
        .expect("install");
    std::fs::copy(fixture_plugin_with("testdev", &["v1"]), old.path().join("libtestdev.so"))
        .expect("install");
    let dir = TempDir::new("demo");
    // A machine type made for older hosts: testdev without the v2 feature,
    // on the portable CPU model.
    let machine = dir.path().join("demo.toml");
    std::fs::write(
        &machine,
        "name = \"demo-2\"\ndescription = \"pc-2 plus the testdev device\"\ncpu = \"x86-64-v1@1\"\n\
         [[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\nproperties = { input = \"none\" }\n\
         [[device]]\nid = \"rtc\"\nplugin = \"cmos-rtc\"\n\
         [[device]]\nid = \"debug-exit\"\nplugin = \"debug-exit\"\n\
         [[device]]\nid = \"dev0\"\nplugin = \"testdev\"\n",
    )
    .expect("machine type");

    println!("ferry demo: {} (this build)", bin_dir().join("ferry").display());
    println!("  source host:      this build's plugins + testdev 3.0.0 (state v3)");
    println!("  destination host: this build's plugins + testdev 1.0.0 (state v1)\n");

    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let spawn = |args: &[&str]| {
        Running::new(
            Command::new(ferry_bin())
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start ferry"),
        )
    };
    // Two hosts' credentials from one CA: the destination accepts only the
    // source's certificate, the source only a destination named old-host.
    let fleet = dir.path().join("fleet");
    let init = Command::new(ferry_bin())
        .args(["tls", "init"])
        .arg(&fleet)
        .args(["--host", "new-host", "--host", "old-host"])
        .output()
        .expect("ferry tls init");
    assert!(init.status.success(), "ferry tls init: {}", String::from_utf8_lossy(&init.stderr));
    let (new_tls, old_tls) =
        (fleet.join("new-host").display().to_string(), fleet.join("old-host").display().to_string());
    println!("ferry tls init {} --host new-host --host old-host", fleet.display());
    let old_dir = old.path().display().to_string();
    let dst = spawn(&[
        "run",
        "--plugins",
        &old_dir,
        "--incoming",
        &uri,
        "--tls-dir",
        &old_tls,
        "--tls-allow",
        "new-host",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let socket = dir.path().join("src.sock");
    let (s, m, n) =
        (socket.display().to_string(), machine.display().to_string(), new.path().display().to_string());
    let mut src = spawn(&[
        "run",
        "--plugins",
        &n,
        "--machine",
        &m,
        "--api-socket",
        &s,
        "--cmdline",
        "ready dev-write=0:0x2a ticks=8 dev-check=0:0x2a exit=0",
    ]);
    assert!(wait_for_path(&socket, LONG), "the source did not start");
    loop {
        let line = src.wait_line("", LONG).expect("source console");
        println!("source      | {line}");
        if tick_number(&line).is_some_and(|t| t >= 3) {
            break;
        }
    }

    let info = Command::new(ferry_bin()).arg("ctl").arg("--api-socket").arg(&socket).arg("info").output();
    let info: serde_json::Value =
        info.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default();
    let cpu = &info["cpu"];
    println!(
        "source      | (cpu {} on {}, TSC {} kHz)",
        cpu["model"].as_str().unwrap_or("?"),
        cpu["vendor"].as_str().unwrap_or("?"),
        cpu["tsc_khz"]
    );

    println!("\nferry ctl migrate {uri} --tls-dir .../new-host --tls-name old-host");
    let out = Command::new(ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["migrate", &uri, "--tls-dir", &new_tls, "--tls-name", "old-host"])
        .output()
        .expect("ferry ctl migrate");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines().find_map(|l| {
            l.trim().strip_prefix(&format!("\"{k}\": ")).map(|v| v.trim_end_matches(',').to_string())
        })
    };
    for line in text.lines().filter(|l| l.starts_with("device ") || l.starts_with("cpu: ")) {
        println!("  plan: {line}");
    }
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let num = |k: &str| field(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    println!(
        "  migrated over {}: total {:.1} ms, downtime {:.2} ms, {:.1} KiB sent\n",
        field("transport").unwrap_or_default().trim_matches('"'),
        num("total_ms"),
        num("downtime_ms"),
        num("bytes_sent") / 1024.0
    );
    let _ = src.finish(LONG);
    let end = dst.finish(LONG);
    for line in end.stdout.lines() {
        println!("destination | {line}");
    }
    let _ = std::io::stdout().flush();
    std::process::exit(end.status.unwrap_or(1));
}
