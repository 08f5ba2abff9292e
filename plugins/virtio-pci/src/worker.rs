//! The device's worker thread: waits on the queues' notification eventfds
//! and the device's backend fds, and processes them under the state lock.
//! While the device is paused it parks without touching guest memory.

use std::{
    os::fd::AsRawFd,
    sync::{atomic::Ordering, Arc},
    thread::JoinHandle,
};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::{transport::Shared, VirtioDevice};

const WAKE: u64 = 0;
const QUEUE_BASE: u64 = 1;
const BACKEND_BASE: u64 = 1 << 32;

pub(crate) fn spawn<D: VirtioDevice>(shared: Arc<Shared<D>>) -> Result<JoinHandle<()>, String> {
    let epoll = Epoll::new().map_err(|e| format!("cannot create epoll: {e}"))?;
    {
        let st = shared.lock();
        let add = |fd: i32, set: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
                .map_err(|e| format!("cannot watch fd {fd}: {e}"))
        };
        add(shared.wake.as_raw_fd(), EventSet::IN, WAKE)?;
        // Queues served elsewhere are kicked there, not here.
        if !st.device.rings_elsewhere() {
            for (i, slot) in st.queues.iter().enumerate() {
                add(slot.kick.as_raw_fd(), EventSet::IN, QUEUE_BASE + i as u64)?;
            }
        }
        for (i, fd) in st.device.backend_fds().into_iter().enumerate() {
            add(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, BACKEND_BASE + i as u64)?;
        }
    }
    std::thread::Builder::new()
        .name("virtio-worker".into())
        .spawn(move || run(&shared, &epoll))
        .map_err(|e| format!("cannot start worker thread: {e}"))
}

fn run<D: VirtioDevice>(shared: &Shared<D>, epoll: &Epoll) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        // Checked before every wait: a stop whose wake-up this thread
        // consumed while handling an earlier event is not lost.
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut st = shared.lock();
        while st.paused {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            st = shared.resumed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        for ev in &events[..n] {
            let token = ev.data();
            let result = if token == WAKE {
                let _ = shared.wake.read();
                Ok(())
            } else if token < BACKEND_BASE {
                let q = (token - QUEUE_BASE) as usize;
                let _ = st.queues[q].kick.read();
                if st.activated {
                    st.with_queues(|d, qs| d.process_queue(q, qs))
                } else {
                    Ok(())
                }
            } else {
                let i = (token - BACKEND_BASE) as usize;
                if st.activated {
                    st.with_queues(|d, qs| d.process_backend(i, qs))
                } else {
                    Ok(())
                }
            };
            if let Err(e) = result {
                st.log_error(&e);
            }
        }
    }
}
