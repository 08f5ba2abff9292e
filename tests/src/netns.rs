//! Network namespaces with a tap interface, created and removed by a test,
//! and raw packet sockets inside them. Traffic never leaves the namespace.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The ethertype test frames use (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;

/// A network namespace, deleted (with its interfaces) on drop.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    /// A new namespace holding tap `tap`, up, IPv6 off (the guest then
    /// receives only the test's frames). None (after a loud SKIPPED line)
    /// where namespaces cannot be made here.
    pub fn with_tap(tap: &str) -> Option<Self> {
        Self::make(tap, false)
    }

    /// The same with IPv6 left on: the kernel sends the guest its own
    /// unsolicited frames (neighbour discovery, multicast listener reports).
    pub fn with_tap_and_ipv6(tap: &str) -> Option<Self> {
        Self::make(tap, true)
    }

    fn make(tap: &str, ipv6: bool) -> Option<Self> {
        Self::make_with(&[tap], ipv6)
    }

    /// A new namespace holding every tap of `taps`, up, IPv6 off.
    pub fn with_taps(taps: &[&str]) -> Option<Self> {
        Self::make_with(taps, false)
    }

    fn make_with(taps: &[&str], ipv6: bool) -> Option<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("ferry-t{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::skip("network namespace tests", "they need root (CAP_NET_ADMIN)");
            return None;
        }
        if let Err(e) = ip(&["netns", "add", &name]) {
            crate::skip("network namespace tests", &e);
            return None;
        }
        let ns = NetNs { name };
        // Without IPv6 on the namespace's links the kernel sends no frames
        // of its own to the guest; with it, it does.
        let v6 = if ipv6 { "0" } else { "1" };
        let setup = ip(&[
            "netns",
            "exec",
            &ns.name,
            "sh",
            "-c",
            &format!("f=/proc/sys/net/ipv6/conf/default/disable_ipv6; [ ! -e $f ] || echo {v6} > $f"),
        ])
        .and_then(|()| {
            taps.iter().try_for_each(|tap| {
                ip(&["-n", &ns.name, "tuntap", "add", tap, "mode", "tap"])
                    .and_then(|()| ip(&["-n", &ns.name, "link", "set", tap, "up"]))
            })
        });
        if let Err(e) = setup {
            crate::skip("network namespace tests", &e);
            return None;
        }
        Some(ns)
    }

    /// Its name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ferry run --plugins <this build's plugins> ARGS` inside the
    /// namespace, with `env` (`NAME=value` each) set and stdio piped.
    pub fn spawn_ferry(&self, env: &[&str], args: &[&str]) -> std::process::Child {
        self.spawn_ferry_on(&crate::bin_dir(), env, args)
    }

    /// [`NetNs::spawn_ferry`] with the plugins in `plugins`.
    pub fn spawn_ferry_on(
        &self,
        plugins: &std::path::Path,
        env: &[&str],
        args: &[&str],
    ) -> std::process::Child {
        let (bin, plugins) = (crate::ferry_bin().display().to_string(), plugins.display().to_string());
        let mut all = vec!["netns", "exec", self.name()];
        if !env.is_empty() {
            all.push("env");
            all.extend_from_slice(env);
        }
        all.extend_from_slice(&[&bin]);
        let mut run = vec!["run", "--plugins", &plugins];
        run.extend_from_slice(args);
        all.extend(crate::run_args(&run));
        crate::spawn_command("ip", &all)
    }

    /// A raw packet socket for [`ETHERTYPE`] bound to `ifname` inside the
    /// namespace (a socket keeps the namespace it was made in).
    fn packet_socket(&self, ifname: &str) -> (OwnedFd, i32) {
        self.packet_socket_for(ifname, ETHERTYPE)
    }

    /// The same for frames of `ethertype`.
    fn packet_socket_for(&self, ifname: &str, ethertype: u16) -> (OwnedFd, i32) {
        let path = format!("/var/run/netns/{}", self.name);
        let ifname = ifname.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this short-lived thread only; the fd is a
            // network namespace file.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let cname = std::ffi::CString::new(ifname).expect("name");
            // SAFETY: a NUL-terminated interface name.
            let index = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
            assert!(index > 0, "interface not found in the namespace");
            let proto = ethertype.to_be();
            // SAFETY: plain socket creation; the fd is checked and owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            // SAFETY: fd is a fresh socket we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index;
            // SAFETY: addr is a sockaddr_ll of the size given.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            (fd, index)
        })
        .join()
        .expect("socket thread")
    }

    /// Start collecting up to `count` [`ETHERTYPE`] frames arriving on
    /// `ifname` (sent by the guest); the socket is bound before this returns.
    pub fn capture(&self, ifname: &str, count: usize, timeout: Duration) -> JoinHandle<Vec<Vec<u8>>> {
        self.capture_ethertype(ifname, ETHERTYPE, count, timeout)
    }

    /// The same for frames of `ethertype` (0x0806: ARP).
    pub fn capture_ethertype(
        &self,
        ifname: &str,
        ethertype: u16,
        count: usize,
        timeout: Duration,
    ) -> JoinHandle<Vec<Vec<u8>>> {
        let (fd, _) = self.packet_socket_for(ifname, ethertype);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut frames = Vec::new();
            let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
            // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            let mut buf = vec![0u8; 2048];
            while frames.len() < count && start.elapsed() < timeout {
                // SAFETY: recv into our buffer of the given length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        })
    }

    /// A function that sends a broadcast [`ETHERTYPE`] frame carrying
    /// `payload` out of `ifname` (towards the guest).
    pub fn injector(&self, ifname: &str) -> impl Fn(&[u8]) + Send + 'static {
        let (fd, index) = self.packet_socket(ifname);
        move |payload: &[u8]| {
            let mut frame = vec![0xffu8; 6];
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
            frame.extend_from_slice(payload);
            frame.resize(frame.len().max(60), 0);
            // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETHERTYPE.to_be();
            addr.sll_ifindex = index;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            // SAFETY: sendto from our buffer to a sockaddr_ll of the size given.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(n, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        }
    }
}

/// Frames sent towards a guest until stopped: see [`NetNs::inject_stream`].
pub struct Stream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<Vec<String>>,
}

impl Stream {
    /// Stop sending; the payloads sent, in order.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("injector thread")
    }
}

impl NetNs {
    /// Send a broadcast [`ETHERTYPE`] frame with payload `HOST-FRAME
    /// <tag><n>` (n = 0, 1, ...) out of `ifname` every `every`, until the
    /// stream is stopped: unsolicited frames the guest did not ask for.
    pub fn inject_stream(&self, ifname: &str, tag: &str, every: Duration) -> Stream {
        let inject = self.injector(ifname);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, tag) = (stop.clone(), tag.to_string());
        let handle = std::thread::spawn(move || {
            let mut sent = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let payload = format!("HOST-FRAME {tag}{}", sent.len());
                inject(payload.as_bytes());
                sent.push(payload);
                std::thread::sleep(every);
            }
            sent
        });
        Stream { stop, handle }
    }
}

/// Check what a guest reported receiving (`NET RECV ...` lines of
/// `outputs`, in order) against the frames `sent` to it: every test frame
/// it reports is one that was sent, once; no frame it reports is one of
/// its own (`FERRY-FRAME ...`). Returns how many test frames it reported.
pub fn check_received(outputs: &[&str], sent: &[String]) -> Result<usize, String> {
    let mut seen: Vec<&str> = Vec::new();
    for line in outputs.iter().flat_map(|o| o.lines()).filter(|l| l.starts_with("NET RECV len=")) {
        let payload = line.split_once("payload=").map(|x| x.1).unwrap_or("");
        if payload.starts_with("FERRY-FRAME") {
            return Err(format!("the guest received one of its own frames: {line}"));
        }
        if !line.contains(" ethertype=88b5 ") {
            continue; // the kernel's own (IPv6) frames
        }
        if !sent.iter().any(|s| s == payload) {
            return Err(format!("the guest received a frame nobody sent it: {line}"));
        }
        if seen.contains(&payload) {
            return Err(format!("the guest received a frame twice: {line}"));
        }
        seen.push(payload);
    }
    Ok(seen.len())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Two namespaces ("hosts") joined by a veth pair, 10.200.0.1 and
/// 10.200.0.2, each with a tap interface of the same name. Removed on drop.
pub struct TwoHosts {
    /// Host A (10.200.0.1).
    pub a: NetNs,
    /// Host B (10.200.0.2).
    pub b: NetNs,
}

impl TwoHosts {
    /// Make them, IPv6 off; None (after a loud SKIPPED line) where that is
    /// not possible.
    pub fn new(tap: &str) -> Option<Self> {
        Self::make(tap, false)
    }

    /// The same with IPv6 left on.
    pub fn with_ipv6(tap: &str) -> Option<Self> {
        Self::make(tap, true)
    }

    fn make(tap: &str, ipv6: bool) -> Option<Self> {
        let a = NetNs::make(tap, ipv6)?;
        let b = NetNs::make(tap, ipv6)?;
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let (va, vb) = (
            format!("fva{}x{n}", std::process::id() % 10000),
            format!("fvb{}x{n}", std::process::id() % 10000),
        );
        let setup = ip(&[
            "link",
            "add",
            &va,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            b.name(),
        ])
        .and_then(|()| ip(&["-n", a.name(), "addr", "add", "10.200.0.1/24", "dev", &va]))
        .and_then(|()| ip(&["-n", b.name(), "addr", "add", "10.200.0.2/24", "dev", &vb]))
        .and_then(|()| ip(&["-n", a.name(), "link", "set", &va, "up"]))
        .and_then(|()| ip(&["-n", b.name(), "link", "set", &vb, "up"]))
        .and_then(|()| ip(&["-n", a.name(), "link", "set", "lo", "up"]))
        .and_then(|()| ip(&["-n", b.name(), "link", "set", "lo", "up"]));
        if let Err(e) = setup {
            crate::skip("two-host tests", &e);
            return None;
        }
        Some(TwoHosts { a, b })
    }
}

/// Hosts (namespaces) on one Ethernet segment: each joined by a veth pair
/// to a bridge in a namespace of its own, host `i` at 10.201.0.`i+1`/24,
/// each holding the same taps. Removed on drop.
pub struct Lan {
    /// The hosts, in order.
    pub hosts: Vec<NetNs>,
    _switch: NetNs,
}

impl Lan {
    /// `n` hosts with `taps` each, IPv6 off; None (after a loud SKIPPED
    /// line) where that is not possible.
    pub fn new(n: usize, taps: &[&str]) -> Option<Self> {
        let switch = NetNs::make_with(&[], false)?;
        let hosts: Vec<NetNs> = (0..n).map(|_| NetNs::with_taps(taps)).collect::<Option<_>>()?;
        let sw = switch.name().to_string();
        let setup = ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])
            .and_then(|()| ip(&["-n", &sw, "link", "set", "br0", "up"]))
            .and_then(|()| {
                hosts.iter().enumerate().try_for_each(|(i, h)| {
                    let (here, there) = (format!("fleet{i}"), format!("port{i}"));
                    ip(&[
                        "link",
                        "add",
                        &here,
                        "netns",
                        h.name(),
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &there,
                        "netns",
                        &sw,
                    ])
                    .and_then(|()| ip(&["-n", &sw, "link", "set", &there, "master", "br0"]))
                    .and_then(|()| ip(&["-n", &sw, "link", "set", &there, "up"]))
                    .and_then(|()| {
                        ip(&["-n", h.name(), "addr", "add", &format!("{}/24", Self::addr(i)), "dev", &here])
                    })
                    .and_then(|()| ip(&["-n", h.name(), "link", "set", &here, "up"]))
                    .and_then(|()| ip(&["-n", h.name(), "link", "set", "lo", "up"]))
                })
            });
        if let Err(e) = setup {
            crate::skip("fleet tests", &e);
            return None;
        }
        Some(Lan { hosts, _switch: switch })
    }

    /// Host `i`'s address.
    pub fn addr(i: usize) -> String {
        format!("10.201.0.{}", i + 1)
    }

    /// Is something listening on TCP `port` in host `i`?
    pub fn listening(&self, i: usize, port: u16) -> bool {
        Command::new("ip")
            .args(["netns", "exec", self.hosts[i].name(), "ss", "-Hltn", &format!("sport = :{port}")])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
    }
}
