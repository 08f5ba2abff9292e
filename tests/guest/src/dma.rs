//! Memory shared with the virtio devices: virtqueues and I/O buffers.
//!
//! One page-aligned block inside the image (section `.dma`, below 16 MiB,
//! not loaded and not zeroed at boot so it costs nothing when unused).
//! Physical address = virtual address (identity map). A buffer belongs to
//! the driver except while it sits in a descriptor the device has not
//! returned yet; only then may the driver read or write it.

use core::arch::global_asm;
use core::ptr::addr_of_mut;

pub const PAGE: usize = 4096;

/// One page per virtqueue (descriptor table, available ring, used ring).
pub const QUEUE_BLK: usize = 0;
pub const QUEUE_RNG: usize = PAGE;
pub const QUEUE_NET_RX: usize = 2 * PAGE;
pub const QUEUE_NET_TX: usize = 3 * PAGE;
/// Small buffers share one page.
pub const BLK_HEADER: usize = 4 * PAGE;
pub const BLK_STATUS: usize = BLK_HEADER + 16;
pub const RNG_BUF: usize = BLK_HEADER + 256;
pub const RNG_BUF_LEN: usize = 256;
pub const NET_TX_BUF: usize = BLK_HEADER + 2048;
pub const NET_TX_SLOT: usize = 128;
pub const NET_TX_SLOTS: usize = 16;
/// Block data: up to 64 sectors of 512 bytes.
pub const BLK_DATA: usize = 5 * PAGE;
pub const BLK_DATA_LEN: usize = 8 * PAGE;
/// Network receive buffers.
pub const NET_RX_BUF: usize = 13 * PAGE;
pub const NET_RX_SLOT: usize = 2048;
pub const NET_RX_SLOTS: usize = 8;
/// Data buffer of `blk-dma-check` only (up to 64 sectors): no other token
/// reads or writes it, so it holds what the device last wrote there.
pub const BLK_CHECK_DATA: usize = 17 * PAGE;
pub const BLK_CHECK_DATA_LEN: usize = 8 * PAGE;
/// virtio-fs: the request queue's page, the request and the reply.
pub const QUEUE_FS: usize = 25 * PAGE;
pub const FS_IN: usize = 26 * PAGE;
pub const FS_IN_LEN: usize = PAGE;
pub const FS_OUT: usize = 27 * PAGE;
pub const FS_OUT_LEN: usize = 2 * PAGE;
/// `blk-bench` with requests in flight: headers (16 bytes each) and status
/// bytes in one page, a data page per request.
pub const BLK_QD_META: usize = 29 * PAGE;
pub const BLK_QD_STATUS: usize = BLK_QD_META + 2048;
pub const BLK_QD_DATA: usize = 30 * PAGE;
pub const BLK_QD_SLOTS: usize = 16;
const SIZE: usize = 46 * PAGE;

const _: () = assert!(RNG_BUF + RNG_BUF_LEN <= NET_TX_BUF);
const _: () = assert!(NET_TX_BUF + NET_TX_SLOT * NET_TX_SLOTS <= BLK_DATA);
const _: () = assert!(BLK_DATA + BLK_DATA_LEN <= NET_RX_BUF);
const _: () = assert!(NET_RX_BUF + NET_RX_SLOT * NET_RX_SLOTS <= BLK_CHECK_DATA);
const _: () = assert!(BLK_CHECK_DATA % PAGE == 0 && BLK_CHECK_DATA + BLK_CHECK_DATA_LEN <= SIZE);
const _: () = assert!(BLK_CHECK_DATA_LEN == BLK_DATA_LEN);
const _: () = assert!(BLK_CHECK_DATA + BLK_CHECK_DATA_LEN <= QUEUE_FS && FS_OUT + FS_OUT_LEN <= BLK_QD_META);
const _: () = assert!(16 * BLK_QD_SLOTS <= 2048 && BLK_QD_DATA + BLK_QD_SLOTS * PAGE <= SIZE);

global_asm!(
    r#"
    .pushsection .dma, "aw", @nobits
    .balign 4096
    .global virtio_dma
virtio_dma:
    .skip {size}
    .popsection
"#,
    size = const SIZE,
    options(att_syntax)
);

extern "C" {
    static mut virtio_dma: [u8; SIZE];
}

/// Address of the byte at `offset` in the block (physical = virtual).
pub fn addr(offset: usize) -> u64 {
    assert!(offset < SIZE);
    addr_of_mut!(virtio_dma) as u64 + offset as u64
}

/// Bytes `offset..offset + len` of the block.
///
/// # Safety
/// The driver must own the range (no device holds it in an outstanding
/// descriptor) and no other slice of it may be alive.
pub unsafe fn bytes(offset: usize, len: usize) -> &'static mut [u8] {
    assert!(offset + len <= SIZE);
    // SAFETY: inside the `.dma` block (checked); exclusivity and device
    // ownership are the caller's contract. Bytes have no invalid values.
    unsafe { core::slice::from_raw_parts_mut(addr(offset) as *mut u8, len) }
}

/// Qwords `offset..offset + 8 * count` of the block (`offset` 8-aligned).
///
/// # Safety
/// As for [`bytes`].
pub unsafe fn words(offset: usize, count: usize) -> &'static mut [u64] {
    assert!(offset % 8 == 0 && offset + 8 * count <= SIZE);
    // SAFETY: as for `bytes`; the block is page-aligned, so the start is
    // 8-aligned, and every bit pattern is a valid u64.
    unsafe { core::slice::from_raw_parts_mut(addr(offset) as *mut u64, count) }
}
