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
//! Each of these lines ends with a check word ([`daxd_bench::cut::line_check`]), so that a line split by
//! the guest kernel's console output is not read as a different promise.

use std::io::Write;
use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkio, Completion, ReqFlags};
use clap::Parser;

use daxd_bench::cut::{checked_line, fill, Plan, BLOCK};

#[derive(Debug, Parser)]
#[command(
    about = "Writes self-describing blocks to a vhost-user-blk disk and reports what completed"
)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: String,
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
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("daxd-cut-client: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
    blkio.set_str("path", &args.socket)?;
    blkio.connect()?;
    blkio.set_i32("num-queues", 1)?;
    let mut started = blkio.start()?;
    let capacity = blkio.get_u64("capacity")?;
    let blocks = capacity / BLOCK as u64;
    let region = blkio.alloc_mem_region(BLOCK)?;
    blkio.map_mem_region(&region)?;
    let buf_ptr = region.addr as *mut u8;
    let q = &mut started.queues[0];
    let mut completions = [MaybeUninit::<Completion>::uninit()];
    let mut wait = |q: &mut blkio::Blkioq| -> Result<i32, Box<dyn std::error::Error>> {
        let mut timeout = Duration::from_secs(60);
        let n = q.do_io(&mut completions, 1, Some(&mut timeout), None)?;
        if n != 1 {
            return Err("a request did not complete within 60 s".into());
        }
        // SAFETY: do_io initialised the first n (= 1) completions.
        Ok(unsafe { completions[0].assume_init_read() }.ret)
    };
    let mut out = std::io::stdout().lock();
    let mut seq = args.first_seq - 1;
    let end = args.ops.map_or(u64::MAX, |ops| seq + ops);
    writeln!(out, "CLIENT-READY {blocks}")?;
    out.flush()?;
    let plan = Plan::new(args.seed, args.first_seq, blocks, args.discard_every);
    for request in plan.take_while(|r| r.seq <= end) {
        seq = request.seq;
        let (block, discard) = (request.block, !request.write);
        let offset = block * BLOCK as u64;
        if discard {
            q.write_zeroes(offset, BLOCK as u64, 0, ReqFlags::empty());
        } else {
            // SAFETY: the mapped region is BLOCK bytes from buf_ptr and lives as long as
            // `blkio`; no request is in flight while the slice exists.
            let buf = unsafe { std::slice::from_raw_parts_mut(buf_ptr, BLOCK) };
            fill(buf, args.seed, block, seq);
            q.write(offset, buf_ptr, BLOCK, 0, ReqFlags::empty());
        }
        let ret = wait(q)?;
        if ret != 0 {
            return Err(format!("request {seq} failed: {ret}").into());
        }
        let kind = if discard { 'Z' } else { 'W' };
        writeln!(
            out,
            "{}",
            checked_line(&format!("ACK {seq} {kind} {block}"))
        )?;
        out.flush()?;
        if args.flush_every != 0 && seq % args.flush_every == 0 {
            q.flush(0, ReqFlags::empty());
            let ret = wait(q)?;
            if ret != 0 {
                return Err(format!("flush after {seq} failed: {ret}").into());
            }
            writeln!(out, "{}", checked_line(&format!("FLUSHED {seq}")))?;
            out.flush()?;
        }
    }
    writeln!(out, "{}", checked_line(&format!("CLIENT-DONE {seq}")))?;
    out.flush()?;
    Ok(())
}
