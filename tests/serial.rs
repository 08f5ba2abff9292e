//! The serial-16550 plugin's backends, driven by a real guest: stdin input,
//! file output, unix-socket output and input.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use ferry_tests::{ferry, ferry_with_stdin, kvm_or_skip, spawn_ferry, wait_ferry, TempDir, DEADLINE};

fn machine_with_console(dir: &TempDir, console: &str) -> String {
    let path = dir.path().join("m.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"console-test\"\n\
             [[device]]\nid = \"com1\"\nplugin = \"serial-16550\"\nproperties = {{ {console} }}\n\
             [[device]]\nid = \"rtc\"\nplugin = \"cmos-rtc\"\n\
             [[device]]\nid = \"debug-exit\"\nplugin = \"debug-exit\"\n"
        ),
    )
    .expect("write machine type");
    path.display().to_string()
}

#[test]
fn stdin_reaches_the_guest() {
    if !kvm_or_skip("stdin_reaches_the_guest") {
        return;
    }
    let run =
        ferry_with_stdin(&["run", "--cmdline", "echo exit=0"], Some(b"hello from the host\n"), DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("ECHO hello from the host"), "{}", run.stdout);
}

#[test]
fn console_to_a_file() {
    if !kvm_or_skip("console_to_a_file") {
        return;
    }
    let dir = TempDir::new("serialfile");
    let log = dir.path().join("console.log");
    let m = machine_with_console(&dir, &format!("output = \"file\", path = \"{}\"", log.display()));
    let run = ferry(&["run", "--machine", &m, "--cmdline", "ready exit=0"], DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    assert!(!run.stdout.contains("FERRY-GUEST"), "console went to stdout too: {}", run.stdout);
    let text = std::fs::read_to_string(&log).expect("console file");
    assert!(text.starts_with("FERRY-GUEST READY cpus=1"), "{text}");
}

#[test]
fn console_on_a_unix_socket_both_ways() {
    if !kvm_or_skip("console_on_a_unix_socket_both_ways") {
        return;
    }
    let dir = TempDir::new("serialsock");
    let sock = dir.path().join("console.sock");
    let m = machine_with_console(&dir, &format!("output = \"socket\", path = \"{}\"", sock.display()));
    // The guest waits for a line first, so nothing it prints is lost
    // before the client connects.
    let child = spawn_ferry(&["run", "--machine", &m, "--cmdline", "echo ready exit=0"]);
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot connect to {}: {e}", sock.display()),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    (&stream).write_all(b"over the socket\n").expect("send line");
    let mut lines = BufReader::new(&stream).lines();
    let echo = lines.next().expect("a line").expect("read line");
    assert_eq!(echo, "ECHO over the socket");
    let ready = lines.next().expect("a line").expect("read line");
    assert!(ready.starts_with("FERRY-GUEST READY"), "{ready}");
    let run = wait_ferry(child, DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
}

#[test]
fn a_long_pasted_line_arrives_whole() {
    if !kvm_or_skip("a_long_pasted_line_arrives_whole") {
        return;
    }
    // 4 KiB in one write, far more than the UART's 64-byte FIFO.
    let line: String = (0..4096).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let input = format!("{line}\n");
    let run = ferry_with_stdin(&["run", "--cmdline", "echo exit=0"], Some(input.as_bytes()), DEADLINE);
    assert_eq!(run.code(), 0, "stderr: {}", run.stderr);
    let echo = run.stdout.lines().find(|l| l.starts_with("ECHO ")).expect("an ECHO line");
    assert_eq!(echo.len(), 5 + 4096, "every byte arrived: {} of 4096", echo.len().saturating_sub(5));
    assert_eq!(&echo[5..], line);
    assert!(!run.stderr.contains("dropped"), "{}", run.stderr);
}
