//! The client of the power-cut suite (tests/powercut.rs): runs next to daxd inside a test
//! guest whose power the suite cuts, and prints, on standard output, what daxd told it, as
//! soon as daxd told it. A line printed before the cut is a promise daxd made; the suite
//! checks the region file on the guest's disk against those promises after the cut.
//!
//! It writes self-describing 4 KiB blocks (magic, block number, sequence number, seed, then
//! bytes derived from them) at random blocks of the disk, one request at a time, and
//! sometimes discards the block it wrote last (write-zeroes with unmap). Lines:
//! - `ACK <seq> W <block>` / `ACK <seq> Z <block>`: the write / zeroing completed;
//! - `FLUSHED <seq>`: a FLUSH submitted after the completion of `<seq>` completed;
//! - `CLIENT-DONE <seq>`: `--ops` requests were made.
//!
//! With `--pmem-device`, it writes the blocks to a virtio-pmem block device instead (e.g.
//! `/dev/pmem0` in a guest whose persistent memory daxd maps through vhost-user shared
//! memory), with O_DIRECT, and a flush is `fdatasync` of the device, which the guest's
//! pmem driver turns into a virtio-pmem FLUSH; no discards.
//!
//! With `--check LOG`, it writes nothing: it reads every block of the disk back through
//! the socket (of a daxd started again, say) and checks them against LOG, what an earlier
//! run with the same seed, first sequence number and discard rate printed, every request
//! up to the last FLUSH that completed having to be there. It prints
//! `CHECKED <blocks> <findings>` and a line per block that broke a promise.
//!
//! Each of these lines ends with a check word ([`daxd_bench::cut::line_check`]), so that a line split by
//! the guest kernel's console output is not read as a different promise.

use std::fs::File;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::{Blkio, Completion, ReqFlags};
use clap::Parser;

use daxd_bench::cut::{check, checked_line, fill, Log, Plan, BLOCK};

#[derive(Debug, Parser)]
#[command(
    about = "Writes self-describing blocks to a vhost-user-blk disk and reports what completed"
)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long, required_unless_present = "pmem_device")]
    socket: Option<String>,
    /// Write to this virtio-pmem block device (e.g. /dev/pmem0) instead, with O_DIRECT;
    /// a flush is fdatasync of the device (a virtio-pmem FLUSH). Needs --discard-every 0.
    #[arg(long, conflicts_with = "socket")]
    pmem_device: Option<PathBuf>,
    /// Seed of the block contents and of the choice of blocks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send a FLUSH after every N requests (0: never, e.g. for a write-through disk).
    #[arg(long, default_value_t = 8)]
    flush_every: u64,
    /// Sequence number of the first request. Runs on the same disk use ranges that do not
    /// overlap, so that blocks from an earlier run are told apart.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    first_seq: u64,
    /// Stop after this many requests (default: run until killed).
    #[arg(long)]
    ops: Option<u64>,
    /// About one request in N is a discard of the block written just before, instead of a
    /// write (0: none).
    #[arg(long, default_value_t = 10)]
    discard_every: u64,
    /// Read the disk back and check it against what an earlier run printed to this file.
    #[arg(long, requires = "socket")]
    check: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("daxd-cut-client: {e}");
        std::process::exit(1);
    }
}

/// One step of the plan, as the disk under test carries it out.
enum Op<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zero { offset: u64 },
    Flush,
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    match (&args.socket, &args.pmem_device) {
        (Some(socket), _) if args.check.is_some() => check_vhost_user(args, socket),
        (Some(socket), _) => run_vhost_user(args, socket),
        (None, Some(device)) => run_pmem(args, device),
        (None, None) => Err("--socket or --pmem-device is needed".into()),
    }
}

/// A one-queue blkio connection to the backend's `socket`, started, and the disk's bytes.
fn connect(
    socket: &str,
) -> Result<(Blkio, blkio::BlkioStartOutcome, u64), Box<dyn std::error::Error>> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", socket)?;
    blkio.connect()?;
    blkio.set_i32("num-queues", 1)?;
    let started = blkio.start()?;
    let capacity = blkio.get_u64("capacity")?;
    Ok((blkio, started, capacity))
}

/// Waits (up to 60 s) for the one request in flight on `q` and returns its result.
fn complete_one(
    q: &mut blkio::Blkioq,
    completions: &mut [MaybeUninit<Completion>; 1],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut timeout = Duration::from_secs(60);
    if q.do_io(completions, 1, Some(&mut timeout), None)? != 1 {
        return Err("a request did not complete within 60 s".into());
    }
    // SAFETY: do_io initialised the first completion.
    match unsafe { completions[0].assume_init_read() }.ret {
        0 => Ok(()),
        ret => Err(format!("error {ret}").into()),
    }
}

fn run_vhost_user(args: &Args, socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let (mut blkio, mut started, capacity) = connect(socket)?;
    let region = blkio.alloc_mem_region(BLOCK)?;
    blkio.map_mem_region(&region)?;
    let buf_ptr = region.addr as *mut u8;
    let q = &mut started.queues[0];
    let mut completions = [MaybeUninit::<Completion>::uninit()];
    requests(args, capacity / BLOCK as u64, |op| {
        match op {
            Op::Write { offset, data } => {
                // SAFETY: the mapped region is BLOCK bytes from buf_ptr and lives as long
                // as `blkio`; no request is in flight while the slice exists.
                let buf = unsafe { std::slice::from_raw_parts_mut(buf_ptr, BLOCK) };
                buf.copy_from_slice(data);
                q.write(offset, buf_ptr, BLOCK, 0, ReqFlags::empty());
            }
            Op::Zero { offset } => q.write_zeroes(offset, BLOCK as u64, 0, ReqFlags::empty()),
            Op::Flush => q.flush(0, ReqFlags::empty()),
        }
        complete_one(q, &mut completions)
    })
}

/// `--check`: every block read back through `socket`, checked against the earlier run's
/// lines.
fn check_vhost_user(args: &Args, socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let log_path = args.check.as_deref().unwrap_or(Path::new(""));
    let printed = std::fs::read_to_string(log_path)
        .map_err(|e| format!("cannot read {}: {e}", log_path.display()))?;
    let (mut blkio, mut started, capacity) = connect(socket)?;
    let blocks = capacity / BLOCK as u64;
    let mut log = Log::parse(&printed);
    log.complete_from(Plan::new(
        args.seed,
        args.first_seq,
        blocks,
        args.discard_every,
    ))?;
    // Read in runs of blocks: one request per block would take minutes under emulation.
    const RUN: usize = 256 * BLOCK;
    let region = blkio.alloc_mem_region(RUN)?;
    blkio.map_mem_region(&region)?;
    let q = &mut started.queues[0];
    let mut completions = [MaybeUninit::<Completion>::uninit()];
    let mut disk = vec![0u8; blocks as usize * BLOCK];
    for (run, data) in disk.chunks_mut(RUN).enumerate() {
        let offset = (run * RUN) as u64;
        q.read(
            offset,
            region.addr as *mut u8,
            data.len(),
            0,
            ReqFlags::empty(),
        );
        complete_one(q, &mut completions).map_err(|e| format!("reading at byte {offset}: {e}"))?;
        // SAFETY: the mapped region is RUN bytes at region.addr and lives as long as
        // `blkio`; the read of data.len() <= RUN bytes into it has completed.
        data.copy_from_slice(unsafe {
            std::slice::from_raw_parts(region.addr as *const u8, data.len())
        });
    }
    let findings = check(&disk, &log, args.seed, log.flushed, None);
    let mut out = std::io::stdout().lock();
    writeln!(out, "CHECKED {blocks} {}", findings.len())?;
    for finding in &findings {
        writeln!(out, "CHECK-FINDING {finding}")?;
    }
    match findings.len() {
        0 => Ok(()),
        n => Err(format!("{n} blocks do not hold what was promised").into()),
    }
}

fn run_pmem(args: &Args, device: &Path) -> Result<(), Box<dyn std::error::Error>> {
    if args.discard_every != 0 {
        return Err("--pmem-device writes only: give --discard-every 0".into());
    }
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(device)
        .map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    let size = std::fs::read_to_string(format!(
        "/sys/class/block/{}/size",
        device.file_name().unwrap_or_default().to_string_lossy()
    ))
    .map_err(|e| format!("cannot read the size of {}: {e}", device.display()))?;
    let blocks = size.trim().parse::<u64>()? * 512 / BLOCK as u64;
    // O_DIRECT wants a block-aligned buffer.
    let mut storage = vec![0u8; 2 * BLOCK];
    let start = storage.as_ptr().align_offset(BLOCK);
    let buf = &mut storage[start..start + BLOCK];
    requests(args, blocks, |op| match op {
        Op::Write { offset, data } => {
            buf.copy_from_slice(data);
            Ok(file.write_all_at(buf, offset)?)
        }
        Op::Zero { .. } => Err("no discards on a pmem device".into()),
        Op::Flush => Ok(file.sync_data()?),
    })
}

/// Carries out the plan on a disk of `blocks` blocks through `execute`, which returns
/// once the disk completed the operation, and prints what completed.
fn requests(
    args: &Args,
    blocks: u64,
    mut execute: impl FnMut(Op) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    let mut seq = args.first_seq - 1;
    let end = args.ops.map_or(u64::MAX, |ops| seq + ops);
    writeln!(out, "CLIENT-READY {blocks}")?;
    out.flush()?;
    let plan = Plan::new(args.seed, args.first_seq, blocks, args.discard_every);
    let mut data = vec![0u8; BLOCK];
    for request in plan.take_while(|r| r.seq <= end) {
        seq = request.seq;
        let (block, discard) = (request.block, !request.write);
        let offset = block * BLOCK as u64;
        let op = if discard {
            Op::Zero { offset }
        } else {
            fill(&mut data, args.seed, block, seq);
            Op::Write {
                offset,
                data: &data,
            }
        };
        execute(op).map_err(|e| format!("request {seq} failed: {e}"))?;
        let kind = if discard { 'Z' } else { 'W' };
        writeln!(
            out,
            "{}",
            checked_line(&format!("ACK {seq} {kind} {block}"))
        )?;
        out.flush()?;
        if args.flush_every != 0 && seq % args.flush_every == 0 {
            execute(Op::Flush).map_err(|e| format!("flush after {seq} failed: {e}"))?;
            writeln!(out, "{}", checked_line(&format!("FLUSHED {seq}")))?;
            out.flush()?;
        }
    }
    writeln!(out, "{}", checked_line(&format!("CLIENT-DONE {seq}")))?;
    out.flush()?;
    Ok(())
}
