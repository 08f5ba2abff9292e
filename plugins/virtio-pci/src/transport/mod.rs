//! The PCI function and BAR 0 of a virtio device: configuration space,
//! common configuration, ISR, device configuration, notifications, MSI-X.
//! State lives behind one mutex shared by the vCPU side (register accesses)
//! and the worker thread (queue processing).

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
};

use ferry_plugin_api::{
    sdk::{PciConfigSpace, PluginDevice},
    state::{self},
    AddressSpace, HostBox, LogLevel, PciBar, PluginError, Region, StateBlob, PCI_BAR_REGION,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod common_config;
mod elsewhere;
mod snapshot;

use crate::{
    layout::{self},
    memory::GuestMemory,
    msix::Msix,
    state::VirtioStateV1,
    worker, QueueSlot, Queues, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Everything the vCPU side and the worker share.
pub(crate) struct State<D: VirtioDevice> {
    pub(crate) device: D,
    pub(crate) host: HostBox,
    pub(crate) mem: GuestMemory,
    pub(crate) queues: Vec<QueueSlot>,
    pub(crate) msix: Msix,
    pub(crate) activated: bool,
    pub(crate) paused: bool,
    /// Queues handed to the device's program (`rings_elsewhere`).
    rings_started: bool,
    config: [u8; 256],
    command: u16,
    bar0: u32,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_vector: u16,
    isr: u8,
    /// Notify addresses registered as ioeventfds, per queue.
    notify_registered: Vec<Option<u64>>,
}

pub(crate) struct Shared<D: VirtioDevice> {
    pub(crate) state: Mutex<State<D>>,
    pub(crate) resumed: Condvar,
    /// Wakes the worker (pause, stop).
    pub(crate) wake: EventFd,
    pub(crate) stop: std::sync::atomic::AtomicBool,
}

impl<D: VirtioDevice> Shared<D> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<D>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A virtio device on the PCI transport: what a device plugin's `create`
/// returns.
pub struct VirtioPci<D: VirtioDevice> {
    shared: Arc<Shared<D>>,
    worker: Option<JoinHandle<()>>,
    pci_taken: bool,
}

fn read_le(bytes: &[u8], data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

fn value_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// Put `device` on the transport and start its worker thread.
    pub fn new(device: D, host: HostBox) -> Result<Self, String> {
        let mem = crate::memory::from_host(&host.guest_memory())?;
        let sizes = device.queue_max_sizes();
        let queues = sizes
            .iter()
            .map(|&max| {
                Ok(QueueSlot {
                    queue: Queue::new(max).map_err(|e| format!("queue size {max}: {e}"))?,
                    vector: layout::NO_VECTOR,
                    kick: EventFd::new(EFD_NONBLOCK).map_err(|e| format!("cannot create eventfd: {e}"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let count = u16::try_from(queues.len()).map_err(|_| "too many queues".to_string())?;
        let msix = Msix::new(queues.len() + 1, host.clone())?;
        let state = State {
            config: layout::config_space(device.device_type(), device.pci_class(), count),
            device_features: device.features() | VIRTIO_F_VERSION_1,
            notify_registered: vec![None; queues.len()],
            device,
            host,
            mem,
            queues,
            msix,
            activated: false,
            paused: false,
            rings_started: false,
            command: 0,
            bar0: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_vector: layout::NO_VECTOR,
            isr: 0,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            resumed: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|e| format!("cannot create eventfd: {e}"))?,
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let worker = worker::spawn(shared.clone())?;
        Ok(VirtioPci { shared, worker: Some(worker), pci_taken: false })
    }
}

impl<D: VirtioDevice> Drop for VirtioPci<D> {
    fn drop(&mut self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        self.shared.resumed.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl<D: VirtioDevice> State<D> {
    fn bar0_address(&self) -> Option<u64> {
        (self.command & 0x2 != 0 && self.bar0 != 0).then_some(u64::from(self.bar0))
    }

    fn log(&self, level: LogLevel, msg: &str) {
        self.host.log(level, msg.into());
    }

    fn activate(&mut self) -> Result<(), String> {
        for (i, slot) in self.queues.iter_mut().enumerate() {
            if slot.queue.ready() && !slot.queue.is_valid(&self.mem) {
                self.host.log(
                    LogLevel::ERROR,
                    format!("queue {i}: invalid layout (addresses outside RAM or misaligned); disabled")
                        .as_str()
                        .into(),
                );
                slot.queue.set_ready(false);
            }
        }
        self.device.activate(self.driver_features)?;
        self.activated = true;
        self.register_notifies()?;
        // Buffers made available before DRIVER_OK: taken now.
        self.serve_queues()?;
        Ok(())
    }

    /// An active device's queues start being served: by the device's
    /// program (at once, or at resume when paused; `start_rings` kicks
    /// every ready queue), or by the worker, kicked here for buffers the
    /// driver made available before.
    fn serve_queues(&mut self) -> Result<(), String> {
        if self.device.rings_elsewhere() {
            return if self.paused { Ok(()) } else { self.start_rings() };
        }
        for slot in &self.queues {
            if slot.queue.ready() {
                let _ = slot.kick.write(1);
            }
        }
        Ok(())
    }

    fn register_notifies(&mut self) -> Result<(), String> {
        let base = match self.bar0_address() {
            Some(b) if self.activated => b,
            _ => return Ok(()),
        };
        for (i, slot) in self.queues.iter().enumerate() {
            let addr = base + layout::NOTIFY + i as u64 * u64::from(layout::NOTIFY_MULTIPLIER);
            if !slot.queue.ready() || self.notify_registered[i] == Some(addr) {
                continue;
            }
            if let Some(old) = self.notify_registered[i].take() {
                let _ = self.host.remove_ioeventfd(slot.kick.as_raw_fd(), old);
            }
            self.host.ioeventfd(slot.kick.as_raw_fd(), addr).into_result().map_err(String::from)?;
            self.notify_registered[i] = Some(addr);
        }
        Ok(())
    }

    fn unregister_notifies(&mut self) {
        for (i, slot) in self.queues.iter().enumerate() {
            if let Some(addr) = self.notify_registered[i].take() {
                let _ = self.host.remove_ioeventfd(slot.kick.as_raw_fd(), addr);
            }
        }
    }

    fn reset(&mut self) {
        if let Err(e) = self.stop_rings(false) {
            self.log(LogLevel::WARN, &format!("reset: {e}"));
        }
        self.unregister_notifies();
        self.device.reset();
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.vector = layout::NO_VECTOR;
            let _ = slot.kick.read();
        }
        // The MSI-X table and its enable bits are PCI state: a virtio reset
        // leaves them as the driver programmed them.
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = layout::NO_VECTOR;
        self.isr = 0;
    }

    /// A reset of the whole PCI function (the guest rebooted): the virtio
    /// reset, plus MSI-X off and its table cleared, decoding off and BAR 0
    /// unassigned, as at power-on.
    fn power_on_reset(&mut self) {
        self.reset();
        self.msix.reset();
        self.command = 0;
        self.bar0 = 0;
    }

    /// Signal used buffers of the queues marked in `completed`.
    pub(crate) fn notify_completed(&mut self, completed: &[bool]) {
        for (q, done) in completed.iter().enumerate() {
            if !*done {
                continue;
            }
            let needs = self.queues[q].queue.needs_notification(&self.mem).unwrap_or(true);
            if needs {
                self.isr |= 1;
                let vector = self.queues[q].vector;
                if vector != layout::NO_VECTOR {
                    self.msix.signal(vector);
                }
            }
        }
    }

    /// Run `f` with the device and its queues, then notify.
    pub(crate) fn with_queues(
        &mut self,
        f: impl FnOnce(&mut D, &mut Queues<'_>) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut completed = vec![false; self.queues.len()];
        let result = {
            let mut queues = Queues { slots: &mut self.queues, mem: &self.mem, completed: &mut completed };
            f(&mut self.device, &mut queues)
        };
        self.notify_completed(&completed);
        result
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < layout::COMMON + layout::COMMON_LEN => self.common_read(o - layout::COMMON, data),
            o if (layout::ISR..layout::ISR + 0x1000).contains(&o) => {
                read_le(&[self.isr], data);
                self.isr = 0; // reading ISR clears it
            }
            o if (layout::DEVICE_CFG..layout::DEVICE_CFG + layout::DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - layout::DEVICE_CFG, data)
            }
            o if (layout::MSIX_TABLE..layout::MSIX_PBA).contains(&o) => {
                self.msix.table_read(o - layout::MSIX_TABLE, data)
            }
            o if o >= layout::MSIX_PBA => self.msix.pba_read(o - layout::MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        match offset {
            o if o < layout::COMMON + layout::COMMON_LEN => self.common_write(o - layout::COMMON, data),
            o if (layout::DEVICE_CFG..layout::DEVICE_CFG + layout::DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - layout::DEVICE_CFG, data);
                Ok(())
            }
            o if (layout::NOTIFY..layout::NOTIFY + 0x1000).contains(&o) => {
                // Reached only while no ioeventfd covers the address.
                let q = ((o - layout::NOTIFY) / u64::from(layout::NOTIFY_MULTIPLIER)) as usize;
                if let Some(slot) = self.queues.get(q) {
                    let _ = slot.kick.write(1);
                }
                Ok(())
            }
            o if (layout::MSIX_TABLE..layout::MSIX_PBA).contains(&o) => {
                self.msix.table_write(o - layout::MSIX_TABLE, data)
            }
            _ => Ok(()),
        }
    }

    fn config_read(&self, offset: u32, data: &mut [u8]) {
        let mut c = self.config;
        c[4..6].copy_from_slice(&self.command.to_le_bytes());
        c[0x10..0x14].copy_from_slice(&self.bar0.to_le_bytes());
        let mut control = u16::from_le_bytes([c[layout::CAP_MSIX + 2], c[layout::CAP_MSIX + 3]]);
        if self.msix.enabled {
            control |= 1 << 15;
        }
        if self.msix.function_masked {
            control |= 1 << 14;
        }
        c[layout::CAP_MSIX + 2..layout::CAP_MSIX + 4].copy_from_slice(&control.to_le_bytes());
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(start + i).copied().unwrap_or(0);
        }
    }

    fn config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        let v = value_of(data);
        match (offset, data.len()) {
            (4, 2) | (4, 4) => self.command = (v as u16) & 0x0406, // memory, bus master, INTx disable
            (0x10, 4) => self.bar0 = (v as u32) & !(layout::BAR0_SIZE as u32 - 1),
            (o, _) if o as usize == layout::CAP_MSIX + 2 || o as usize == layout::CAP_MSIX => {
                // Message control, alone or as the upper half of the dword.
                let control = if o as usize == layout::CAP_MSIX { (v >> 16) as u16 } else { v as u16 };
                if o as usize == layout::CAP_MSIX && data.len() < 4 {
                    return Ok(());
                }
                self.msix.enabled = control & (1 << 15) != 0;
                self.msix.function_masked = control & (1 << 14) != 0;
                self.msix.control_changed()?;
            }
            (o, 1) if o as usize == layout::CAP_MSIX + 3 => {
                self.msix.enabled = v & 0x80 != 0;
                self.msix.function_masked = v & 0x40 != 0;
                self.msix.control_changed()?;
            }
            _ => {}
        }
        // BAR 0 moved or decoding switched: follow with the notify eventfds.
        if self.activated {
            match self.bar0_address() {
                Some(_) => self.register_notifies()?,
                None => self.unregister_notifies(),
            }
        }
        Ok(())
    }

    fn bar(&self) -> PciBar {
        PciBar {
            index: 0,
            size: layout::BAR0_SIZE,
            address: u64::from(self.bar0),
            is_64bit: false,
            enabled: self.command & 0x2 != 0,
        }
    }
}

impl<D: VirtioDevice> PluginDevice for VirtioPci<D> {
    fn regions(&self) -> Vec<Region> {
        // Everything is behind BAR 0; no fixed ranges.
        let _ = AddressSpace::MMIO;
        Vec::new()
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), String> {
        if region == PCI_BAR_REGION {
            self.shared.lock().bar_read(offset, data);
        } else {
            data.fill(0xff);
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), String> {
        if region == PCI_BAR_REGION {
            self.shared.lock().bar_write(offset, data)
        } else {
            Ok(())
        }
    }

    fn pause(&mut self) -> Result<(), String> {
        // Taking the lock waits out any processing in progress; the worker
        // parks at its next wake-up. Queues served elsewhere are stopped
        // and drained.
        let mut st = self.shared.lock();
        st.paused = true;
        let stopped = st.stop_rings(true);
        drop(st);
        let _ = self.shared.wake.write(1);
        stopped
    }

    fn resume(&mut self) -> Result<(), String> {
        let mut st = self.shared.lock();
        st.paused = false;
        let started = if st.activated { st.start_rings() } else { Ok(()) };
        drop(st);
        self.shared.resumed.notify_all();
        started
    }

    fn reset(&mut self) -> Result<(), PluginError> {
        self.shared.lock().power_on_reset();
        Ok(())
    }

    fn save_state(&mut self, version: u32) -> Result<StateBlob, String> {
        state::check_save(state::versions::<D::State>(), version, "this plugin")?;
        let s = self.shared.lock().save(version)?;
        Ok(StateBlob { version, bytes: state::encode(&s)?.into() })
    }

    fn load_state(&mut self, blob: StateBlob) -> Result<(), String> {
        state::check_load(state::versions::<D::State>(), blob.version, "this plugin")?;
        let s: VirtioStateV1 = state::decode(blob.bytes.as_slice())?;
        self.shared.lock().restore(blob.version, &s)
    }

    fn contract(&mut self) -> Result<Vec<(String, String)>, PluginError> {
        self.shared
            .lock()
            .device
            .contract()
            .ok_or_else(|| PluginError::unsupported("this device has no contract"))
    }

    fn take_pci_function(&mut self) -> Option<Box<dyn PciConfigSpace>> {
        if self.pci_taken {
            return None;
        }
        self.pci_taken = true;
        Some(Box::new(PciPart { shared: self.shared.clone() }))
    }
}

/// The configuration-space side handed to the core.
struct PciPart<D: VirtioDevice> {
    shared: Arc<Shared<D>>,
}

impl<D: VirtioDevice> PciConfigSpace for PciPart<D> {
    fn config_read(&mut self, offset: u32, data: &mut [u8]) {
        self.shared.lock().config_read(offset, data);
    }

    fn config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        self.shared.lock().config_write(offset, data)
    }

    fn bars(&self) -> Vec<PciBar> {
        vec![self.shared.lock().bar()]
    }
}

impl<D: VirtioDevice> State<D> {
    pub(crate) fn log_error(&self, msg: &str) {
        self.log(LogLevel::ERROR, msg);
    }
}

#[cfg(test)]
mod tests;
