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
    AddressSpace, DeviceConfig, HostBox, LogLevel, PluginDescriptor, PropertyKind, Region,
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
        env!("CARGO_PKG_VERSION"),
        "16550A UART: guest console to stdout, a file or a unix socket",
    )
    .property("port", PropertyKind::Integer, Some("0x3f8"), "base I/O port (8 ports)")
    .property("irq", PropertyKind::Integer, Some("4"), "interrupt line (GSI)")
    .property("output", PropertyKind::String, Some("stdout"), "stdout | file | socket | none")
    .property("path", PropertyKind::String, Some(""), "file or socket path for output=file|socket")
    .property("input", PropertyKind::String, Some("stdin"), "stdin | none (socket output reads the socket)")
    .state(UartStateV1::CURRENT, UartStateV1::OLDEST_LOAD, UartStateV1::OLDEST_SAVE)
    .build()
}

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

impl Versioned for UartStateV1 {
    const CURRENT: u32 = 1;
    const OLDEST_LOAD: u32 = 1;

    fn load_version(_version: u32, bytes: &[u8]) -> Result<Self, String> {
        let s: UartStateV1 = state::decode(bytes)?;
        if s.rx_fifo.len() > FIFO_SIZE {
            return Err(format!("receive FIFO of {} bytes, the UART holds {FIFO_SIZE}", s.rx_fifo.len()));
        }
        Ok(s)
    }

    fn save_version(&self, _version: u32) -> Result<Vec<u8>, String> {
        state::encode(self)
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

        if stdin_input {
            spawn_input(Box::new(std::io::stdin()), uart.clone(), paused.clone(), host.clone())?;
        }
        if let (Some(listener), Some(client)) = (listener, socket_client) {
            let (uart, paused, host) = (uart.clone(), paused.clone(), host.clone());
            thread::Builder::new()
                .name("serial-accept".into())
                .spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let Ok(reader) = stream.try_clone() else {
                            continue;
                        };
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                        let _ = spawn_input(Box::new(reader), uart.clone(), paused.clone(), host.clone());
                    }
                })
                .map_err(|e| format!("cannot start socket thread: {e}"))?;
        }
        Ok(Serial16550 { port, gsi, uart, paused, host, reported_output_error: false })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Feed bytes from `input` into the UART's receive FIFO as the guest drains it.
fn spawn_input(
    mut input: Input,
    uart: Arc<Mutex<Uart>>,
    paused: Arc<AtomicBool>,
    host: HostBox,
) -> Result<(), String> {
    thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    if !paused.load(Ordering::Acquire) {
                        let mut uart = uart.lock().unwrap_or_else(|e| e.into_inner());
                        match uart.enqueue_raw_bytes(pending) {
                            Ok(taken) => pending = &pending[taken..],
                            Err(e) => {
                                host.log(LogLevel::Warn, format!("input dropped: {e:?}").as_str().into());
                                pending = &[];
                            }
                        }
                    }
                    if !pending.is_empty() {
                        // FIFO full (or paused): the guest has not read it yet.
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start input thread: {e}"))
}

impl PluginDevice for Serial16550 {
    fn regions(&self) -> Vec<Region> {
        vec![Region { space: AddressSpace::Pio, base: self.port.into(), len: 8 }]
    }

    fn read(&mut self, _region: u32, offset: u64, data: &mut [u8]) -> Result<(), String> {
        let value = self.lock().read(offset as u8);
        data.fill(value);
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
                    self.host.log(LogLevel::Warn, format!("console output failed: {e:?}").as_str().into());
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

    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        state::save(&UartStateV1::from(self.lock().state()), version)
    }

    fn load_state(&mut self, blob: StateBlob) -> Result<(), String> {
        let s = state::load::<UartStateV1>(&blob)?;
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
        if !typed.is_empty() {
            let _ = uart.enqueue_raw_bytes(&typed);
        }
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
        testing::check_round_trip(&[UartStateV1::from(SerialState::default()), s.clone()]);
        s.rx_fifo = vec![b'x'; 65];
        let bytes = state::encode(&s).unwrap();
        let err = state::load::<UartStateV1>(&StateBlob { version: 1, bytes: bytes.into() }).unwrap_err();
        assert!(err.contains("65 bytes"), "{err}");
    }
}
