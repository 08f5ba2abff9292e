//! serial-16550's state versions:
//!
//! | version | release | state |
//! |---|---|---|
//! | v1 | 0.1 | every 16550 register and the receive FIFO |
//! | v2 | 0.2 | v1 plus the host input waiting behind the FIFO |
//!
//! v1 upgrades with an empty backlog; a downgrade to v1 is refused while
//! host input waits (v1 cannot carry it).

use ferry_plugin_api::{
    serde,
    state::{self, Versioned},
};
use vm_superio::serial::SerialState;

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
pub(crate) const FIFO_SIZE: usize = 64;

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
pub(crate) const MAX_BACKLOG: usize = 1 << 20;

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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_plugin_api::{testing, StateBlob};

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
