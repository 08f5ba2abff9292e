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
use ferry_plugin_api::{
    serde,
    state::{self, Versioned},
    StateBlob,
};
use vm_superio::{
    serial::{NoEvents, SerialState},
    Serial, Trigger,
};

use crate::backend::{bind_socket, open_file, Input, Output};

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
    .property("path", PropertyKind::STRING, Some(""), "file or socket path for output=file|socket")
    .property("input", PropertyKind::STRING, Some("stdin"), "stdin | none (socket output reads the socket)")
    .state(UartState::CURRENT, UartState::OLDEST_LOAD, UartState::OLDEST_SAVE)
    .build()
}

/// This build's release: the current one, or the previous (state v1 only)
/// with the `previous-release` feature, which compatibility tests install
/// on an "older" host.
#[cfg(feature = "previous-release")]
const RELEASE: &str = "0.1.0";
#[cfg(not(feature = "previous-release"))]
const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// State v1: every 16550 register and the receive FIFO (what the guest has
/// not read yet). Where output goes is configuration, not state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct UartStateV1 {
    divisor_low: u8,
    divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    rx_fifo: Vec<u8>,
}

/// The 16550 FIFO depth.
const FIFO_SIZE: usize = 64;

/// State v2 (release 0.2): v1 plus the host input read but not yet in the
/// receive FIFO (the guest had not drained it). v1 cannot carry it, so
/// writing v1 is refused while there is any.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(crate = "ferry_plugin_api::serde")]
pub struct UartStateV2 {
    uart: UartStateV1,
    input_backlog: Vec<u8>,
}

/// The state this release works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UartState {
    /// Registers and FIFO.
    pub uart: UartStateV1,
    /// Host input waiting behind the FIFO.
    pub input_backlog: Vec<u8>,
}

/// Longest input backlog saved (what the host typed ahead of the guest).
const MAX_BACKLOG: usize = 1 << 20;

fn check_fifo(s: &UartStateV1) -> Result<(), String> {
    if s.rx_fifo.len() > FIFO_SIZE {
        return Err(format!("receive FIFO of {} bytes, the UART holds {FIFO_SIZE}", s.rx_fifo.len()));
    }
    Ok(())
}

impl Versioned for UartState {
    #[cfg(feature = "previous-release")]
    const CURRENT: u32 = 1;
    #[cfg(not(feature = "previous-release"))]
    const CURRENT: u32 = 2;
    const OLDEST_LOAD: u32 = 1;
    const OLDEST_SAVE: u32 = 1;

    fn load_version(version: u32, bytes: &[u8]) -> Result<Self, String> {
        let s = match version {
            1 => UartState { uart: state::decode(bytes)?, input_backlog: Vec::new() },
            _ => {
                let v: UartStateV2 = state::decode(bytes)?;
                if v.input_backlog.len() > MAX_BACKLOG {
                    return Err(format!("input backlog of {} bytes", v.input_backlog.len()));
                }
                UartState { uart: v.uart, input_backlog: v.input_backlog }
            }
        };
        check_fifo(&s.uart)?;
        Ok(s)
    }

    fn save_version(&self, version: u32) -> Result<Vec<u8>, String> {
        match version {
            1 if !self.input_backlog.is_empty() => Err(format!(
                "{} bytes of host input wait behind the receive FIFO; v1 cannot carry them",
                self.input_backlog.len()
            )),
            1 => state::encode(&self.uart),
            _ => state::encode(&UartStateV2 {
                uart: self.uart.clone(),
                input_backlog: self.input_backlog.clone(),
            }),
        }
    }
}

impl From<SerialState> for UartStateV1 {
    fn from(s: SerialState) -> Self {
        UartStateV1 {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }
}

impl From<&UartStateV1> for SerialState {
    fn from(s: &UartStateV1) -> Self {
        SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        }
    }
}

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

#[cfg(test)]
mod state_tests {
    use super::*;
    use ferry_plugin_api::testing;

    #[test]
    fn state_round_trips_and_an_overfull_fifo_is_refused() {
        let mut s = UartStateV1::from(SerialState::default());
        s.rx_fifo = b"typed ahead".to_vec();
        s.line_control = 0x03;
        let plain = UartState { uart: UartStateV1::from(SerialState::default()), input_backlog: vec![] };
        let with_input = UartState { uart: s.clone(), input_backlog: vec![] };
        testing::check_round_trip(&[plain.clone(), with_input]);
        testing::check_upgrades(&[(
            1,
            state::encode(&s).unwrap(),
            UartState { uart: s.clone(), input_backlog: vec![] },
        )]);
        if UartState::CURRENT >= 2 {
            let waiting = UartState { uart: s.clone(), input_backlog: b"more".to_vec() };
            testing::check_refused_downgrade(
                &waiting,
                1,
                "4 bytes of host input wait behind the receive FIFO",
            );
        }
        s.rx_fifo = vec![b'x'; 65];
        let bytes = state::encode(&s).unwrap();
        let err = state::load::<UartState>(&StateBlob { version: 1, bytes: bytes.into() }).unwrap_err();
        assert!(err.contains("65 bytes"), "{err}");
    }
}
