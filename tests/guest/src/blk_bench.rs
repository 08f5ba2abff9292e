//! `blk-bench=<r|w>:<n>`: `n` sequential 4 KiB virtio-blk requests, one
//! in flight at a time, each timed with the TSC from just before the
//! notify write to the moment the driver sees the used index advance.
//! `blk-bench=<r|w>:<n>:<depth>` keeps `depth` (up to 16) requests in
//! flight: each completion is answered by the next request in its slot,
//! timed from its notify to the moment the driver sees it used.
//!
//! Every request is the same 3-descriptor chain: header, the first page of
//! the block data buffer (its contents are irrelevant), status byte. The
//! sectors cycle through the first min(capacity, 64 MiB) of the disk.

use crate::blk::{Blk, SECTOR, STATUS_OK, TIMEOUT_MS, T_IN, T_OUT};
use crate::serial::Tenths;
use crate::virtq::{Deadline, DESC_NEXT, DESC_WRITE};
use crate::{dma, tsc};

/// Most requests per token.
pub const MAX_REQUESTS: u64 = 100_000;
/// Most requests in flight.
pub const MAX_DEPTH: u64 = dma::BLK_QD_SLOTS as u64;
/// 4 KiB per request.
const REQUEST_SECTORS: u64 = (dma::PAGE / SECTOR) as u64;
/// Requests stay within the first 64 MiB of the disk.
const SPAN_SECTORS: u64 = (64 << 20) / SECTOR as u64;

/// Latencies in TSC ticks.
struct Stats {
    sum: u64,
    min: u64,
    max: u64,
}

/// Runs the benchmark and prints `BLK BENCH ...` (or `CALIBRATE FAILED`
/// if the TSC cannot be calibrated). `None` on a timeout.
pub fn run(blk: &mut Blk, write: bool, count: u64) -> Option<()> {
    let Some(hz) = calibrated() else { return Some(()) };
    // A disk smaller than one request still gets requests (at sector 0);
    // the device fails them, which `status_errors` shows.
    let slots = (blk.capacity().min(SPAN_SECTORS) / REQUEST_SECTORS).max(1);
    let (kind, data_flags) = if write { (T_OUT, 0) } else { (T_IN, DESC_WRITE) };
    let q = &mut blk.q;
    q.set_desc(0, dma::addr(dma::BLK_HEADER), 16, DESC_NEXT);
    q.set_desc(1, dma::addr(dma::BLK_DATA), dma::PAGE as u32, DESC_NEXT | data_flags);
    q.set_desc(2, dma::addr(dma::BLK_STATUS), 1, DESC_WRITE);

    let irqs_start = blk.q.irqs();
    let mut errors = 0u64;
    let mut stats = Stats { sum: 0, min: u64::MAX, max: 0 };
    // One timer setup for the whole run; each request gets the full limit.
    let mut deadline = Deadline::start(TIMEOUT_MS);
    let start = tsc::read();
    for i in 0..count {
        blk.prepare(kind, (i % slots) * REQUEST_SECTORS);
        let q = &mut blk.q;
        q.push(0);
        q.publish();
        deadline.restart();
        let irqs_before = q.irqs();
        let sent = tsc::read();
        q.notify();
        let seen = q.wait_idle_with(&mut deadline, irqs_before)?;
        q.pop();
        let ticks = seen.wrapping_sub(sent);
        stats.sum += ticks;
        stats.min = stats.min.min(ticks);
        stats.max = stats.max.max(ticks);
        if blk.status() != STATUS_OK {
            errors += 1;
        }
    }
    let total = tsc::read() - start;
    drop(deadline);

    report(hz, write, count, 1, total, &stats, blk.q.irqs() - irqs_start, errors);
    Some(())
}

/// The TSC's rate, or `CALIBRATE FAILED <why>` printed and None.
fn calibrated() -> Option<u64> {
    tsc::hz().map_err(|reason| crate::println!("CALIBRATE FAILED {}", reason)).ok()
}

/// Prints `BLK BENCH op=... n=... [depth=...] total_us=... ...` (the
/// depth only when more than one request was in flight).
#[allow(clippy::too_many_arguments)]
fn report(hz: u64, write: bool, count: u64, depth: usize, total: u64, stats: &Stats, irqs: u64, errors: u64) {
    // Tenths of a microsecond.
    let tenths_us = |ticks: u64, div: u64| tsc::scale(ticks, 10_000_000, hz.saturating_mul(div));
    let op = if write { "write" } else { "read" };
    let (total_us, avg, min, max) = (
        tsc::scale(total, 1_000_000, hz),
        Tenths(tenths_us(stats.sum, count)),
        Tenths(tenths_us(stats.min, 1)),
        Tenths(tenths_us(stats.max, 1)),
    );
    if depth > 1 {
        crate::println!(
            "BLK BENCH op={} n={} depth={} total_us={} avg_us={} min_us={} max_us={} irqs={} status_errors={}",
            op, count, depth, total_us, avg, min, max, irqs, errors
        );
    } else {
        crate::println!(
            "BLK BENCH op={} n={} total_us={} avg_us={} min_us={} max_us={} irqs={} status_errors={}",
            op, count, total_us, avg, min, max, irqs, errors
        );
    }
}

/// Write request `i`'s header (and preset its status) for slot `slot`.
fn prepare_slot(slot: usize, kind: u32, sector: u64) {
    // SAFETY: the slot's header and status byte belong to the driver: the
    // device returned the slot's last request (or never had one).
    unsafe {
        let header = dma::bytes(dma::BLK_QD_META + 16 * slot, 16);
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[4..8].fill(0);
        header[8..].copy_from_slice(&sector.to_le_bytes());
        dma::bytes(dma::BLK_QD_STATUS + slot, 1)[0] = 0xFF;
    }
}

fn slot_status(slot: usize) -> u8 {
    // SAFETY: a volatile one-byte load inside the `.dma` block.
    unsafe { (dma::addr(dma::BLK_QD_STATUS + slot) as *const u8).read_volatile() }
}

/// `depth` requests in flight; prints `BLK BENCH ... depth=<d>`. `None` on
/// a timeout (no completion within the limit).
pub fn run_depth(blk: &mut Blk, write: bool, count: u64, depth: u64) -> Option<()> {
    let Some(hz) = calibrated() else { return Some(()) };
    let depth = (depth as usize).min(dma::BLK_QD_SLOTS).min(usize::from(blk.q.size) / 3).max(1);
    let slots = (blk.capacity().min(SPAN_SECTORS) / REQUEST_SECTORS).max(1);
    let (kind, data_flags) = if write { (T_OUT, 0) } else { (T_IN, DESC_WRITE) };
    for s in 0..depth {
        let d = (3 * s) as u16;
        let q = &mut blk.q;
        q.set_desc(d, dma::addr(dma::BLK_QD_META + 16 * s), 16, DESC_NEXT);
        q.set_desc(d + 1, dma::addr(dma::BLK_QD_DATA + dma::PAGE * s), dma::PAGE as u32, DESC_NEXT | data_flags);
        q.set_desc(d + 2, dma::addr(dma::BLK_QD_STATUS + s), 1, DESC_WRITE);
    }
    let irqs_start = blk.q.irqs();
    let mut errors = 0u64;
    let mut stats = Stats { sum: 0, min: u64::MAX, max: 0 };
    let mut sent_at = [0u64; dma::BLK_QD_SLOTS];
    let mut deadline = Deadline::start(TIMEOUT_MS);
    let start = tsc::read();
    let (mut issued, mut done) = (0u64, 0u64);
    // Fill every slot, one notify for the lot.
    for (s, at) in sent_at.iter_mut().enumerate().take(depth.min(count as usize)) {
        prepare_slot(s, kind, (issued % slots) * REQUEST_SECTORS);
        blk.q.push((3 * s) as u16);
        issued += 1;
        *at = tsc::read();
    }
    blk.q.kick();
    while done < count {
        let Some((head, _)) = blk.q.pop() else {
            if !deadline.sleep() {
                return None;
            }
            continue;
        };
        deadline.restart();
        let s = usize::from(head) / 3;
        let ticks = tsc::read().wrapping_sub(sent_at[s]);
        stats.sum += ticks;
        stats.min = stats.min.min(ticks);
        stats.max = stats.max.max(ticks);
        if slot_status(s) != STATUS_OK {
            errors += 1;
        }
        done += 1;
        if issued < count {
            prepare_slot(s, kind, (issued % slots) * REQUEST_SECTORS);
            blk.q.push((3 * s) as u16);
            issued += 1;
            sent_at[s] = tsc::read();
            blk.q.kick();
        }
    }
    let total = tsc::read() - start;
    drop(deadline);
    report(hz, write, count, depth, total, &stats, blk.q.irqs() - irqs_start, errors);
    Some(())
}
