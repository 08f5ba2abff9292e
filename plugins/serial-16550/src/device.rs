//! The UART and its input thread.
//!
//! ```text
//!   vCPU thread --read/write--> Mutex<vm_superio::Serial> --bytes--> Output
//!   input thread (stdin or socket) --enqueue_raw_bytes--^      |
//!                                                 IRQ pulse <-+ (Trigger)
//! ```

use std::{
    io::Read,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use ferry_plugin_api::{
    sdk::{DescriptorBuilder, PluginDevice, Properties},
    AddressSpace, DeviceConfig, HostBox, LogLevel, PluginDescriptor, PluginError, PropertyKind, Region,
};
use ferry_plugin_api::{state, StateBlob};
use vm_superio::{
    serial::{NoEvents, SerialState},
    Serial, Trigger,
};

use crate::{
    backend::{bind_socket, open_file, Input, Output},
    state::{UartState, UartStateV1, FIFO_SIZE, MAX_BACKLOG},
};

type Uart = Serial<IrqLine, NoEvents, Output>;

pub fn describe() -> PluginDescriptor {
    DescriptorBuilder::new(
        "serial-16550",
        RELEASE,
        "16550A UART: guest console to stdout, a file or a unix socket",
    )
    .property("port", PropertyKind::INTEGER, Some("0x3f8"), "base I/O port (8 ports)")
    .property("irq", PropertyKind::INTEGER, Some("4"), "interrupt line (GSI)")
    .property("output", PropertyKind::STRING, Some("stdout"), "stdout | file | socket | none")
    .binding("path", Some(""), "file or socket path for output=file|socket (a host binding)")
    .property("input", PropertyKind::STRING, Some("stdin"), "stdin | none (socket output reads the socket)")
    .versioned::<UartState>()
    .build()
}

/// This build's release: the current one, or the previous (state v1 only)
/// with the `previous-release` feature, which compatibility tests install
/// on an "older" host.
#[cfg(feature = "previous-release")]
const RELEASE: &str = "0.1.0";
#[cfg(not(feature = "previous-release"))]
const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Raises the UART's interrupt line as an edge (ISA interrupts are edges).
pub struct IrqLine {
    host: HostBox,
    gsi: u32,
}

impl Trigger for IrqLine {
    type E = String;

    fn trigger(&self) -> Result<(), String> {
        self.host.set_irq_level(self.gsi, true).into_result()?;
        self.host.set_irq_level(self.gsi, false).into_result()?;
        Ok(())
    }
}

pub struct Serial16550 {
    port: u16,
    gsi: u32,
    uart: Arc<Mutex<Uart>>,
    backlog: Arc<Backlog>,
    paused: Arc<AtomicBool>,
    host: HostBox,
    reported_output_error: bool,
}

impl Serial16550 {
    pub fn create(config: &DeviceConfig, host: HostBox) -> Result<Self, String> {
        let props = Properties::new(config);
        let port = props.integer("port")?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p <= u16::MAX - 7)
            .ok_or_else(|| format!("port {port:#x} does not fit 8 registers below 0x10000"))?;
        let gsi = u32::try_from(props.integer("irq")?).map_err(|_| "irq is too large".to_string())?;
        let path = props.string("path")?;
        let need_path = |what: &str| {
            if path.is_empty() {
                Err(format!("output={what} needs the 'path' property"))
            } else {
                Ok(())
            }
        };
        let mut listener = None;
        let output = match props.string("output")? {
            "stdout" => Output::Stdout,
            "file" => {
                need_path("file")?;
                open_file(path)?
            }
            "socket" => {
                need_path("socket")?;
                listener = Some(bind_socket(path)?);
                Output::Socket(Arc::new(Mutex::new(None)))
            }
            "none" => Output::Discard,
            other => return Err(format!("output '{other}' is not one of stdout, file, socket, none")),
        };
        let stdin_input = match props.string("input")? {
            "stdin" => listener.is_none(),
            "none" => false,
            other => return Err(format!("input '{other}' is not one of stdin, none")),
        };
        let socket_client = match &output {
            Output::Socket(client) => Some(client.clone()),
            _ => None,
        };
        let uart = Arc::new(Mutex::new(Serial::new(IrqLine { host: host.clone(), gsi }, output)));
        let paused = Arc::new(AtomicBool::new(false));

        let backlog = Arc::new(Backlog::default());
        spawn_drain(uart.clone(), backlog.clone(), paused.clone(), host.clone())?;
        if stdin_input {
            spawn_input(Box::new(std::io::stdin()), backlog.clone())?;
        }
        if let (Some(listener), Some(client)) = (listener, socket_client) {
            let backlog = backlog.clone();
            thread::Builder::new()
                .name("serial-accept".into())
                .spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let Ok(reader) = stream.try_clone() else {
                            continue;
                        };
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                        let _ = spawn_input(Box::new(reader), backlog.clone());
                    }
                })
                .map_err(|e| format!("cannot start socket thread: {e}"))?;
        }
        Ok(Serial16550 { port, gsi, uart, backlog, paused, host, reported_output_error: false })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Host input read but not yet in the receive FIFO. The input thread
/// stops reading its source while [`MAX_BACKLOG`] bytes wait, and the
/// drain thread moves bytes only as the guest empties the FIFO, so input
/// is taken as fast as the guest reads it and nothing is dropped.
#[derive(Default)]
pub struct Backlog {
    bytes: Mutex<std::collections::VecDeque<u8>>,
    /// Bytes arrived, or the device resumed.
    arrived: std::sync::Condvar,
    /// The guest read from the FIFO, or the drain took bytes: room.
    room: std::sync::Condvar,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Read host input into the backlog until the input ends.
fn spawn_input(mut input: Input, backlog: Arc<Backlog>) -> Result<(), String> {
    thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                // Backpressure: read more only while there is room.
                {
                    let mut q = backlog.lock();
                    while q.len() + buf.len() > MAX_BACKLOG {
                        q = backlog.room.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                }
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                backlog.lock().extend(&buf[..n]);
                backlog.arrived.notify_all();
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start input thread: {e}"))
}

/// Move backlog bytes into the receive FIFO as the guest drains it (not
/// while the device is paused).
fn spawn_drain(
    uart: Arc<Mutex<Uart>>,
    backlog: Arc<Backlog>,
    paused: Arc<AtomicBool>,
    host: HostBox,
) -> Result<(), String> {
    thread::Builder::new()
        .name("serial-drain".into())
        .spawn(move || loop {
            let chunk: Vec<u8> = {
                let mut q = backlog.lock();
                while q.is_empty() || paused.load(Ordering::Acquire) {
                    q = backlog
                        .arrived
                        .wait_timeout(q, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                q.iter().take(FIFO_SIZE).copied().collect()
            };
            // Only what fits: a full FIFO waits for the guest to read it.
            let taken = {
                let mut u = uart.lock().unwrap_or_else(|e| e.into_inner());
                let fits = u.fifo_capacity().min(chunk.len());
                match u.enqueue_raw_bytes(&chunk[..fits]) {
                    Ok(n) => n,
                    Err(vm_superio::serial::Error::FullFifo) => 0,
                    Err(e) => {
                        // The bytes are in the FIFO; the interrupt failed.
                        host.log(LogLevel::WARN, format!("input interrupt: {e:?}").as_str().into());
                        fits
                    }
                }
            };
            let mut q = backlog.lock();
            let n = taken.min(q.len());
            q.drain(..n);
            backlog.room.notify_all();
            if taken < chunk.len() {
                // The FIFO is full until the guest reads from it.
                let _ =
                    backlog.room.wait_timeout(q, Duration::from_millis(5)).unwrap_or_else(|e| e.into_inner());
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start input thread: {e}"))
}

impl PluginDevice for Serial16550 {
    fn regions(&self) -> Vec<Region> {
        vec![Region { space: AddressSpace::PIO, base: self.port.into(), len: 8 }]
    }

    fn read(&mut self, _region: u32, offset: u64, data: &mut [u8]) -> Result<(), String> {
        let value = self.lock().read(offset as u8);
        data.fill(value);
        if offset == 0 {
            // Receiving (or the divisor latch): room for waiting input.
            self.backlog.room.notify_all();
        }
        Ok(())
    }

    fn write(&mut self, _region: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        let Some(&value) = data.first() else {
            return Ok(());
        };
        let result = self.lock().write(offset as u8, value);
        match result {
            Ok(()) => Ok(()),
            Err(vm_superio::serial::Error::Trigger(e)) => Err(format!("raising interrupt: {e}")),
            Err(e) => {
                // Losing console output must not stop the guest; say it once.
                if !self.reported_output_error {
                    self.reported_output_error = true;
                    self.host.log(LogLevel::WARN, format!("console output failed: {e:?}").as_str().into());
                }
                Ok(())
            }
        }
    }

    fn pause(&mut self) -> Result<(), String> {
        self.paused.store(true, Ordering::Release);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        self.paused.store(false, Ordering::Release);
        Ok(())
    }

    /// Power-on registers and an empty FIFO (what the old guest had not
    /// read is gone, as on hardware); the console stays, and host input
    /// not yet handed to the UART waits for the new guest.
    fn reset(&mut self) -> Result<(), PluginError> {
        let mut uart = self.lock();
        let placeholder = Serial::new(IrqLine { host: self.host.clone(), gsi: self.gsi }, Output::Discard);
        let out = std::mem::replace(&mut *uart, placeholder).into_writer();
        *uart = Serial::new(IrqLine { host: self.host.clone(), gsi: self.gsi }, out);
        Ok(())
    }

    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        let uart = UartStateV1::from(self.lock().state());
        let input_backlog = self.backlog.lock().iter().copied().collect();
        state::save(&UartState { uart, input_backlog }, version)
    }

    fn load_state(&mut self, blob: StateBlob) -> Result<(), String> {
        let UartState { uart: s, input_backlog } = state::load::<UartState>(&blob)?;
        let mut uart = self.lock();
        // Input the host typed into this (fresh) UART before the state
        // arrived belongs to the guest too: keep it behind the saved FIFO.
        let typed = uart.state().in_buffer;
        // Rebuild the register model around the same output.
        let placeholder = Serial::new(IrqLine { host: self.host.clone(), gsi: self.gsi }, Output::Discard);
        let out = std::mem::replace(&mut *uart, placeholder).into_writer();
        let irq = IrqLine { host: self.host.clone(), gsi: self.gsi };
        *uart = Serial::from_state(&SerialState::from(&s), irq, NoEvents, out)
            .map_err(|e| format!("restoring the UART: {e:?}"))?;
        // Saved backlog first, then what this host typed before the state came.
        let mut q = self.backlog.lock();
        let typed_here: Vec<u8> = q.drain(..).collect();
        q.extend(input_backlog);
        q.extend(typed);
        q.extend(typed_here);
        drop(q);
        self.backlog.arrived.notify_all();
        Ok(())
    }
}
