//! The virtio-blk device of daxd, without any transport.
//!
//! Requests are parsed from descriptor chains ([`request`]) and executed on byte ranges of
//! the region's mapping ([`execute`]): data moves straight between guest memory and the
//! mapped file, with no read/write system call and no bounce buffer.

pub mod execute;
pub mod guest_windows;
pub mod request;
pub mod stats;
pub mod wire;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

pub use daxd_fault::Release;
use daxd_fault::{Faults, Io, Op, Verdict};
use daxd_record::{DiskLog, FlushSlot};
use daxd_region::{Region, Window, PAGE_SIZE, SECTOR_SHIFT, SECTOR_SIZE};
use daxd_registry::Registry;
use daxd_virtio::RefusalLog;

use execute::{ExecError, Executed};
pub use request::{ChainBuffers, ParsedChain, Request, RequestError};
use stats::{BlkMetrics, Kind, QueueStats, METRICS_VERSION};
use wire::VirtioBlkConfig;

/// Bytes of a virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = 20;
/// Largest discard or write-zeroes segment, in sectors (1 GiB): large enough that guests
/// split rarely, small enough that one fallocate never stalls a queue for long.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Errors in the device's configuration.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("serial {0:?} is longer than 20 bytes; virtio-blk serials hold at most 20")]
    SerialTooLong(String),
    #[error("the region is read-only, so the blk device must be read-only too")]
    WritableOnReadOnlyRegion,
    #[error("queue size {0} is invalid: use a power of two from 2 to 32768")]
    QueueSize(u16),
    #[error("number of queues {0} is invalid: use 1 to 64")]
    NumQueues(u16),
    #[error("window {0} is not served as blk or lies outside the region")]
    BadWindow(String),
    #[error("the disk is {size} bytes; it only grows while a guest may use it, so {requested} bytes is refused")]
    Shrink { size: u64, requested: u64 },
    #[error("{0} bytes is not a multiple of 4 KiB")]
    UnalignedSize(u64),
    #[error("the disk at region byte {base} cannot grow to {requested} bytes: the region has {region_size} bytes")]
    BeyondRegion {
        base: u64,
        requested: u64,
        region_size: u64,
    },
}

/// The serial reported by GET_ID: up to 20 bytes, zero padded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Serial([u8; SERIAL_LEN]);

impl Serial {
    /// A user-chosen serial.
    pub fn new(text: &str) -> Result<Serial, BlkError> {
        let bytes = text.as_bytes();
        if bytes.len() > SERIAL_LEN {
            return Err(BlkError::SerialTooLong(text.to_owned()));
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..bytes.len()].copy_from_slice(bytes);
        Ok(Serial(serial))
    }

    /// The default serial of a region file: a hash of its canonical path and inode number,
    /// so it is the same every time daxd serves that file and differs between files.
    pub fn for_file(path: &Path, ino: u64) -> Serial {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        // FNV-1a: tiny, and fixed forever, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = canonical.as_os_str().as_encoded_bytes();
        for &b in bytes.iter().chain(ino.to_le_bytes().iter()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let text = format!("daxd-{:015x}", hash >> 4);
        Serial::new(&text).expect("20 bytes")
    }

    pub fn as_bytes(&self) -> &[u8; SERIAL_LEN] {
        &self.0
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(SERIAL_LEN);
        write!(f, "{}", String::from_utf8_lossy(&self.0[..end]))
    }
}

/// What the user configured for the blk device.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    pub num_queues: u16,
    pub queue_size: u16,
    /// Report `VIRTIO_BLK_F_RO` and refuse every write, discard and write-zeroes.
    pub read_only: bool,
    /// Write-through: each write, discard and write-zeroes is durable before it completes,
    /// and no FLUSH feature is offered (the guest sees a write-through cache).
    pub sync: bool,
    pub serial: Serial,
}

/// What a request may do, given the device's configuration and the features the driver
/// accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// What [`BlkDevice::handle`] did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Handled {
    /// Completed; the chain's used length.
    Done(u32),
    /// A FLUSH, still to be completed with [`BlkDevice::flush`] and
    /// [`BlkDevice::complete_flush`].
    Flush(PendingFlush),
    /// Executed, with its status written, but to be completed (its used entry published)
    /// only once `release` says so: a fault rule delays or holds it.
    Later { used: u32, release: Release },
}

/// The outcome of one flush of the region ([`BlkDevice::flush`]), for the FLUSH requests
/// it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    status: u8,
}

/// A FLUSH request waiting for the region to be flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFlush {
    status: vm_memory::GuestAddress,
    queue: usize,
    started: Instant,
    /// Once flushed, complete it only when this says so (a fault rule delays or holds it).
    pub release: Option<Release>,
    /// Its place in the write log, while recording.
    logged: Option<FlushSlot>,
}

/// Guest physical memory that is a window of the region (a pmem window the VMM mapped from
/// the region file): guest buffers there are region pages and get pinned while in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestWindow {
    pub gpa: u64,
    pub len: u64,
    pub region_offset: u64,
}

/// The virtio-blk device: configuration plus the window of the region it serves.
#[derive(Debug)]
pub struct BlkDevice {
    region: Arc<Region>,
    registry: Arc<Registry>,
    /// Byte offset of the disk's sector 0 in the region.
    base: u64,
    /// Disk size in bytes. It only grows ([`BlkDevice::grow`]), so a request checked
    /// against an older value is still inside the disk.
    size: AtomicU64,
    config: BlkConfig,
    refusals: RefusalLog,
    /// Per queue.
    stats: Box<[QueueStats]>,
    region_flushes: AtomicU64,
    /// The queues' bytes written when the last flush started: what the next one covers.
    written_at_flush: AtomicU64,
    /// Fault rules (none unless a user sets some).
    faults: Arc<Faults>,
    /// Where stored writes and FLUSHes are logged (`--record`).
    record: Option<Arc<DiskLog>>,
}

impl BlkDevice {
    /// The disk over `window` of `region`; requests consult `registry` where the bytes are
    /// guest-visible.
    pub fn new(
        region: Arc<Region>,
        registry: Arc<Registry>,
        window: &Window,
        config: BlkConfig,
    ) -> Result<BlkDevice, BlkError> {
        if !window.serve.blk() || region.check_range(window.offset, window.size).is_err() {
            return Err(BlkError::BadWindow(window.name.clone()));
        }
        if region.is_read_only() && !config.read_only {
            return Err(BlkError::WritableOnReadOnlyRegion);
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 2 {
            return Err(BlkError::QueueSize(config.queue_size));
        }
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(BlkError::NumQueues(config.num_queues));
        }
        Ok(BlkDevice {
            region,
            registry,
            base: window.offset,
            size: AtomicU64::new(window.size),
            stats: (0..config.num_queues)
                .map(|_| QueueStats::default())
                .collect(),
            region_flushes: AtomicU64::new(0),
            written_at_flush: AtomicU64::new(0),
            config,
            refusals: RefusalLog::new("virtio-blk"),
            faults: Arc::new(Faults::new(vec![daxd_fault::DISK.to_owned()])),
            record: None,
        })
    }

    /// The device with `faults` for its rules (shared with the pmem windows and the
    /// control socket) instead of rules of its own.
    pub fn with_faults(mut self, faults: Arc<Faults>) -> BlkDevice {
        self.faults = faults;
        self
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// The device, logging every write, discard and write-zeroes it stores and every
    /// FLUSH it makes durable to `log`.
    pub fn with_record(mut self, log: Arc<DiskLog>) -> BlkDevice {
        self.record = Some(log);
        self
    }

    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// What the device refused (malformed requests, rings out of step), counted and
    /// logged without flooding.
    pub fn refusals(&self) -> &RefusalLog {
        &self.refusals
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the disk to `size` bytes of the region from its first byte on; returns the
    /// size before. Requests see the new capacity from their next batch on, and the config
    /// space from its next read: telling the driver (a config change) is the caller's job.
    /// Whether the new bytes may belong to the disk (other windows) is the caller's to
    /// check too; here only that they are in the region.
    pub fn grow(&self, size: u64) -> Result<u64, BlkError> {
        if size % PAGE_SIZE != 0 {
            return Err(BlkError::UnalignedSize(size));
        }
        if self.region.check_range(self.base, size).is_err() {
            return Err(BlkError::BeyondRegion {
                base: self.base,
                requested: size,
                region_size: self.region.size(),
            });
        }
        // One resize at a time comes from the control socket, but a lost race must not
        // shrink: compare and swap.
        let mut current = self.size();
        loop {
            if size < current {
                return Err(BlkError::Shrink {
                    size: current,
                    requested: size,
                });
            }
            match self
                .size
                .compare_exchange(current, size, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(before) => return Ok(before),
                Err(now) => current = now,
            }
        }
    }

    /// Virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_MQ;
        if !self.config.sync {
            features |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if self.config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    /// The device's config space.
    pub fn config_space(&self) -> VirtioBlkConfig {
        // A file's page cache takes any sector and writes whole pages back; a block
        // device addresses its logical blocks and writes its physical ones whole.
        let kind = self.region.kind();
        let (logical, physical) = (kind.logical_block(), kind.physical_block());
        let logical_per_physical = (physical / logical).max(1);
        let max_segments = (request::MAX_DISCARD_SEGMENTS as u32).into();
        VirtioBlkConfig {
            capacity: (self.size() >> SECTOR_SHIFT).into(),
            // Room for the header and the status in a queue-sized chain.
            seg_max: (u32::from(self.config.queue_size) - 2).into(),
            blk_size: logical.into(),
            physical_block_exp: logical_per_physical.trailing_zeros() as u8,
            min_io_size: (logical_per_physical as u16).into(),
            num_queues: self.config.num_queues.into(),
            max_discard_sectors: MAX_DISCARD_SECTORS.into(),
            max_discard_seg: max_segments,
            discard_sector_alignment: (physical / SECTOR_SIZE as u32).into(),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS.into(),
            max_write_zeroes_seg: max_segments,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Exactly `size` bytes of config space from `offset`, zero beyond what daxd defines
    /// (frontends ask for their own `sizeof(struct virtio_blk_config)`).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        daxd_virtio::config_bytes(self.config_space().as_slice(), offset, size)
    }

    /// The limits requests are checked against, given the driver's accepted features.
    pub fn limits(&self, acked_features: u64) -> DeviceLimits {
        let acked = |bit: u32| acked_features & (1 << bit) != 0;
        DeviceLimits {
            capacity_sectors: self.size() >> SECTOR_SHIFT,
            read_only: self.config.read_only,
            discard: acked(VIRTIO_BLK_F_DISCARD),
            write_zeroes: acked(VIRTIO_BLK_F_WRITE_ZEROES),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        }
    }

    /// Parses and executes one chain. Every request but a valid FLUSH is completed here:
    /// its status is written and [`Handled::Done`] carries the number of bytes written into
    /// the chain's writable buffers (the used length). A FLUSH is returned as
    /// [`Handled::Flush`], to be completed with [`BlkDevice::complete_flush`] so that the
    /// queue need not wait for the disk. `guest_windows` lists the guest memory that is
    /// region pages (usually none).
    pub fn handle<M: GuestMemoryBackend>(
        &self,
        queue: usize,
        descriptors: impl IntoIterator<Item = Descriptor>,
        mem: &M,
        limits: &DeviceLimits,
        guest_windows: &[GuestWindow],
        bufs: &mut ChainBuffers,
    ) -> Handled {
        let stats = &self.stats[queue.min(self.stats.len() - 1)];
        let started = stats.sampled().then(Instant::now);
        let parsed = request::parse(descriptors, mem, limits, &mut bufs.chain);
        let Some(status_addr) = parsed.status else {
            if let Err(e) = parsed.request {
                self.refusals
                    .refused(format_args!("dropping request without a status byte: {e}"));
            }
            stats.dropped();
            return Handled::Done(0);
        };
        let mut release = None;
        let (kind, status, written) = match parsed.request {
            Ok(request) => {
                let kind = Kind::of(&request);
                let executed = if self.faults.any() {
                    let (executed, later) =
                        self.execute_with_faults(&request, queue, bufs, mem, guest_windows);
                    release = later;
                    executed
                } else {
                    self.execute(&request, bufs, mem, guest_windows)
                };
                if let (Some(log), Ok(Executed::Done(_))) = (&self.record, &executed) {
                    self.record_stored(log, &request);
                }
                match executed {
                    Ok(Executed::Done(written)) => {
                        let bytes = match request {
                            Request::Read { .. } => written,
                            Request::Write { data, .. } => data.len,
                            _ => 0,
                        };
                        stats.request(kind, VIRTIO_BLK_S_OK as u8, bytes);
                        (kind, VIRTIO_BLK_S_OK as u8, written)
                    }
                    Ok(Executed::Dropped) => {
                        stats.request(kind, VIRTIO_BLK_S_OK as u8, 0);
                        (kind, VIRTIO_BLK_S_OK as u8, 0)
                    }
                    Ok(Executed::Flush) => {
                        stats.flush_started();
                        return Handled::Flush(PendingFlush {
                            status: status_addr,
                            queue,
                            started: started.unwrap_or_else(Instant::now),
                            release,
                            logged: self.record.as_ref().map(|log| log.flush_handed_over()),
                        });
                    }
                    Err(e) => {
                        // A fault rule's failure is what the user asked for: not logged.
                        if !matches!(e, ExecError::Fault(_)) {
                            self.refusals
                                .refused(format_args!("request {request:?} failed: {e}"));
                        }
                        stats.request(kind, e.status(), 0);
                        (kind, e.status(), 0)
                    }
                }
            }
            Err(e) => {
                self.refusals.refused(format_args!("refusing request: {e}"));
                stats.request(Kind::Invalid, e.status(), 0);
                (Kind::Invalid, e.status(), 0)
            }
        };
        if let Err(e) = put_status(mem, status_addr, status) {
            // Checked while parsing; only a memory table change under our feet gets here.
            self.refusals.refused(format_args!(
                "cannot write status at {:#x}: {e}",
                status_addr.0
            ));
            return Handled::Done(0);
        }
        if let Some(started) = started {
            if kind != Kind::Invalid {
                stats.request_took(started.elapsed());
            }
        }
        // written <= the writable stream, which is at most 4 GiB by virtio's chain limit.
        let used = (written + 1) as u32;
        match release {
            Some(release) => Handled::Later { used, release },
            None => Handled::Done(used),
        }
    }

    /// Executes `request` as the fault rules say: not at all (a failure, a dropped write),
    /// with a byte corrupted, or with its completion left for later (the release).
    #[cold]
    #[inline(never)]
    fn execute_with_faults<M: GuestMemoryBackend>(
        &self,
        request: &Request,
        queue: usize,
        bufs: &mut ChainBuffers,
        mem: &M,
        guest_windows: &[GuestWindow],
    ) -> (Result<Executed, ExecError>, Option<Release>) {
        match self
            .faults
            .check(daxd_fault::DISK, &fault_io(request, queue))
        {
            Verdict::Pass => (self.execute(request, bufs, mem, guest_windows), None),
            Verdict::Fail(status) => (Err(ExecError::Fault(status)), None),
            Verdict::Drop => {
                let dropped = match request {
                    Request::Flush => Executed::Done(0),
                    _ => Executed::Dropped,
                };
                (Ok(dropped), None)
            }
            Verdict::Corrupt { at, mask } => {
                let executed = self
                    .execute(request, bufs, mem, guest_windows)
                    .and_then(|done| self.corrupt(request, bufs, mem, at, mask).map(|()| done));
                (executed, None)
            }
            Verdict::Later(release) => (
                self.execute(request, bufs, mem, guest_windows),
                Some(release),
            ),
        }
    }

    /// The disk's counters, per queue.
    pub fn metrics(&self) -> BlkMetrics {
        BlkMetrics {
            version: METRICS_VERSION,
            region_flushes: self.region_flushes.load(Ordering::Relaxed),
            writes_pwrite: self.region.writes_pwrite(),
            write_path_changes: self.region.write_path_changes(),
            queues: self
                .stats
                .iter()
                .enumerate()
                .map(|(queue, stats)| stats.snapshot(queue))
                .collect(),
        }
    }

    /// Flushes the region for FLUSH requests: every write completed before they were
    /// handled becomes durable. Each of them then gets the outcome with
    /// [`BlkDevice::complete_flush`]; one flush serves every FLUSH handled before it
    /// started (group commit).
    pub fn flush(&self) -> Flushed {
        let status = match self.flush_region() {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                self.refusals.refused(format_args!("flush failed: {e}"));
                e.status()
            }
        };
        self.region_flushes.fetch_add(1, Ordering::Relaxed);
        Flushed { status }
    }

    /// Completes a FLUSH request with the outcome of a [`BlkDevice::flush`] that started
    /// after it was handled. Returns its used length: 1, or 0 where the status could not
    /// be written.
    pub fn complete_flush<M: GuestMemoryBackend>(
        &self,
        flush: &PendingFlush,
        flushed: Flushed,
        mem: &M,
    ) -> u32 {
        if let Some(stats) = self.stats.get(flush.queue) {
            stats.flush_completed(flushed.status, flush.started.elapsed());
        }
        if let (Some(log), Some(slot)) = (&self.record, flush.logged) {
            log.flushed(slot, flushed.status == VIRTIO_BLK_S_OK as u8);
        }
        match put_status(mem, flush.status, flushed.status) {
            Ok(()) => 1,
            Err(e) => {
                let at = flush.status.0;
                self.refusals
                    .refused(format_args!("cannot write status at {at:#x}: {e}"));
                0
            }
        }
    }

    /// Requests refused so far (malformed, or failed on the disk).
    pub fn refused_requests(&self) -> u64 {
        self.refusals.count()
    }
}

/// A parsed request as fault rules see it.
fn fault_io(request: &Request, queue: usize) -> Io {
    let span = |offset: u64, len: u64| {
        let start = offset >> SECTOR_SHIFT;
        [start, start + len.div_ceil(SECTOR_SIZE)]
    };
    // One segment at most (MAX_DISCARD_SEGMENTS).
    let segment = |list: &request::DiscardList| {
        list.as_slice()
            .first()
            .map_or([0, 0], |s| [s.sector, s.sector + u64::from(s.sectors)])
    };
    let (op, sectors) = match request {
        Request::Read { offset, data } => (Op::Read, span(*offset, data.len)),
        Request::Write { offset, data } => (Op::Write, span(*offset, data.len)),
        Request::Flush => (Op::Flush, [0, 0]),
        Request::GetId { .. } => (Op::GetId, [0, 0]),
        Request::Discard(list) => (Op::Discard, segment(list)),
        Request::WriteZeroes(list) => (Op::WriteZeroes, segment(list)),
    };
    Io {
        op,
        queue: u16::try_from(queue).unwrap_or(u16::MAX),
        sectors,
    }
}

impl BlkDevice {
    /// Logs what an executed request stored. Cold: only while recording.
    #[cold]
    #[inline(never)]
    fn record_stored(&self, log: &DiskLog, request: &Request) {
        match request {
            Request::Write { offset, data } => {
                log.write(offset >> SECTOR_SHIFT, data.len, |file, at| {
                    self.region
                        .copy_to_file(self.base + offset, data.len, file, at)
                })
            }
            Request::Discard(list) | Request::WriteZeroes(list) => {
                for segment in list.as_slice() {
                    log.discard(segment.sector, u64::from(segment.sectors) << SECTOR_SHIFT);
                }
            }
            Request::Read { .. } | Request::Flush | Request::GetId { .. } => {}
        }
    }
}

/// Writes a request's status byte with one store into the region that holds it: the
/// general `Bytes::write_obj` walks vm-memory's iterator over regions, whose inlining, and
/// with it every request's cost, varies from build to build.
fn put_status<M: GuestMemoryBackend>(
    mem: &M,
    at: GuestAddress,
    status: u8,
) -> Result<(), vm_memory::GuestMemoryError> {
    GuestMemoryBackend::get_slice(mem, at, 1)?
        .write_obj(status, 0)
        .map_err(Into::into)
}

#[cfg(test)]
mod tests;
