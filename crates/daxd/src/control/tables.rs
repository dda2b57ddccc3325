//! `daxd inspect`'s tables.

use daxd_blk::stats::Kind;
use std::fmt::Write as _;

use daxd_blk::stats::LatencyHistogram;
use daxd_fault::RuleInfo;
use daxd_region::PAGE_SIZE;
use daxd_registry::{FrameRange, Target};

use super::protocol::{Inspection, ServeKind};

fn frames_text(frames: FrameRange) -> String {
    format!(
        "{}..{} (bytes {:#x}..{:#x})",
        frames.start,
        frames.end,
        frames.start * PAGE_SIZE,
        frames.end * PAGE_SIZE
    )
}

// Writing into a String cannot fail; the results of writeln! below are ignored for that
// reason.
pub(super) fn tables(v: &Inspection) -> String {
    let mut out = String::new();
    let region = &v.region;
    let _ = writeln!(
        out,
        "region {} ({}): {} bytes, {} page frames, {}-byte blocks{}",
        region.path.display(),
        region.kind,
        region.size,
        region.frames,
        region.logical_block,
        if region.map_sync { ", MAP_SYNC" } else { "" }
    );
    if let Some(how) = &region.cache_write_back {
        let _ = writeln!(
            out,
            "FLUSH writes back the cache lines stored into with {how}: {} bytes so far, \
             {} fdatasync calls where the file's blocks changed",
            region.written_back, region.write_back_fdatasyncs
        );
    }
    let _ = writeln!(out, "\nWINDOW       OFFSET        SIZE          SERVE");
    for w in &v.windows {
        let serve = match w.serve {
            ServeKind::Blk => "blk",
            ServeKind::Pmem => "pmem",
            ServeKind::Both => "both",
        };
        let _ = writeln!(
            out,
            "{:<12} {:<13} {:<13} {serve}",
            w.name,
            format!("{:#x}", w.offset),
            format!("{:#x}", w.size),
        );
    }
    let r = &v.registry;
    let _ = writeln!(
        out,
        "\ndescriptors: {} ({} bytes); flush epoch {}, last flushed {}",
        r.descriptors, r.descriptor_bytes, r.epoch, r.last_flushed
    );
    let _ = writeln!(out, "\nMAPPING  OWNER                            TARGET                 FRAMES                                   WRITABLE  DEVICE");
    for m in &r.mappings {
        let target = match &m.target {
            Target::GuestPhysical { gpa } => format!("gpa {gpa:#x}"),
            Target::SharedMemory { shmid, offset } => format!("shm {shmid} +{offset:#x}"),
        };
        let _ = writeln!(
            out,
            "{:<8} {:<32} {:<22} {:<40} {:<9} {}",
            m.id.0,
            m.owner,
            target,
            frames_text(m.frames),
            m.writable,
            m.device
        );
    }
    let _ = writeln!(
        out,
        "\nDESCRIPTORS FOR FRAMES                         MAPPED    PINNED    DIRTY     MAX MAPS"
    );
    for s in &r.sections {
        let _ = writeln!(
            out,
            "{:<46} {:<9} {:<9} {:<9} {}",
            frames_text(s.frames),
            s.mapped,
            s.pinned,
            s.dirty,
            s.max_map_count
        );
    }
    if r.busy.is_empty() {
        let _ = writeln!(out, "\nbusy ranges: none");
    } else {
        let _ = writeln!(out, "\nBUSY FRAMES                                    FOR");
        for b in &r.busy {
            let _ = writeln!(out, "{:<46} {}", frames_text(b.frames), b.what);
        }
    }
    let blk = &v.blk;
    let _ = writeln!(
        out,
        "\nQUEUE  READ       WRITE      FLUSH      DISCARD    WZEROES    GET_ID     INVALID    OK         IOERR      UNSUPP     READ BYTES       WRITTEN BYTES    FLUSH p50/max"
    );
    for q in &blk.queues {
        let count = |kind: Kind| q.count(kind);
        let _ = writeln!(
            out,
            "{:<6} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<16} {:<16} {}",
            q.queue,
            count(Kind::Read),
            count(Kind::Write),
            count(Kind::Flush),
            count(Kind::Discard),
            count(Kind::WriteZeroes),
            count(Kind::GetId),
            count(Kind::Invalid),
            q.ok,
            q.ioerr,
            q.unsupp,
            q.bytes_read,
            q.bytes_written,
            percentiles(&q.flush_latency),
        );
    }
    let _ = writeln!(
        out,
        "region flushes: {}; FLUSHes in flight: {}; writes through {} ({} changes)",
        blk.region_flushes,
        blk.queues.iter().map(|q| q.flushes_in_flight).sum::<u64>(),
        if blk.writes_pwrite {
            "pwrite(2)"
        } else {
            "the mapping"
        },
        blk.write_path_changes
    );
    if v.faults.is_empty() {
        let _ = writeln!(out, "\nfault rules: none");
    } else {
        let _ = write!(out, "\n{}", fault_table(&v.faults));
    }
    out
}

/// The fault rules, one a line, with their hits.
pub(super) fn fault_table(rules: &[RuleInfo]) -> String {
    if rules.is_empty() {
        return "no fault rules\n".to_owned();
    }
    let mut out = String::from("RULE  HITS       MATCHED    RULE TEXT\n");
    for r in rules {
        let mut notes = String::new();
        if !r.armed {
            let _ = write!(
                notes,
                " (waiting for mark {})",
                r.spec.after.as_deref().unwrap_or("?")
            );
        }
        if let Some(bad) = r.bad_sectors {
            let _ = write!(notes, " ({bad} sectors still bad)");
        }
        let _ = writeln!(
            out,
            "{:<5} {:<10} {:<10} {}{notes}",
            r.id, r.hits, r.matched, r.rule
        );
    }
    out
}

/// "p50/max" of a histogram as bucket bounds ("<=64us/<=1ms"), "-" when empty.
fn percentiles(h: &LatencyHistogram) -> String {
    let total = h.count();
    if total == 0 {
        return "-".to_owned();
    }
    let bound = |i: usize| match h.bounds_us.get(i) {
        Some(us) if *us >= 1000 => format!("<={}ms", us / 1000),
        Some(us) => format!("<={us}us"),
        None => format!(">{}ms", h.bounds_us.last().copied().unwrap_or(0) / 1000),
    };
    let mut seen = 0;
    let mut p50 = None;
    let mut max = 0;
    for (i, n) in h.counts.iter().enumerate() {
        seen += n;
        if p50.is_none() && seen * 2 >= total {
            p50 = Some(i);
        }
        if *n > 0 {
            max = i;
        }
    }
    format!("{}/{}", bound(p50.unwrap_or(0)), bound(max))
}
