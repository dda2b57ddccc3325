use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::{Header, Super, FLUSH, FUA, SECTOR};
use crate::states::{copy_image, for_each_state, Kind, Options, State};
use crate::writer::FLUSH_FAILED;
use crate::{DiskLog, Entry, LogError, LogReader, Op, BLOCK};

/// A log of: write A at block 0, FLUSH, mark, write B at block 1, write C at block 0
/// (512 bytes at 1024), discard of block 2, FLUSH, write D at block 3 (the tail).
fn sample_log(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.log");
    let log = DiskLog::create(&path).unwrap();
    let data = |byte: u8, len: usize| {
        move |f: &std::fs::File, at: u64| f.write_all_at(&vec![byte; len], at)
    };
    log.write(0, BLOCK, data(b'A', BLOCK as usize));
    let first = log.flush_handed_over();
    log.flushed(first, true);
    log.mark("fsynced-a");
    log.write(8, BLOCK, data(b'B', BLOCK as usize));
    log.write(2, 512, data(b'C', 512));
    log.discard(16, BLOCK);
    let second = log.flush_handed_over();
    log.write(24, BLOCK, data(b'D', BLOCK as usize));
    // Completed after the write that followed its handover: still in its place.
    log.flushed(second, true);
    log.finish();
    path
}

fn base(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("base.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(8 * BLOCK).unwrap();
    f.write_all_at(&vec![b'z'; (3 * BLOCK) as usize], 0)
        .unwrap();
    path
}

#[test]
fn a_log_reads_back_as_written_in_dm_log_writes_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_log(dir.path());
    let raw = std::fs::read(&path).unwrap();
    // dm-log-writes' super block: magic, version 1, entries, sector size.
    assert_eq!(&raw[0..8], &0x006a_7366_7773_6872u64.to_le_bytes());
    assert_eq!(&raw[8..16], &1u64.to_le_bytes());
    assert_eq!(&raw[16..24], &8u64.to_le_bytes());
    assert_eq!(&raw[24..28], &512u32.to_le_bytes());
    let log = LogReader::open(&path).unwrap();
    let entries: Vec<Entry> = log.entries().collect::<Result<_, _>>().unwrap();
    let ops: Vec<(bool, &Op)> = entries.iter().map(|e| (e.flush_before, &e.op)).collect();
    assert!(matches!(
        ops[0],
        (
            false,
            Op::Write {
                at: 0,
                bytes: 4096,
                ..
            }
        )
    ));
    assert_eq!(ops[1], (true, &Op::Nothing));
    assert_eq!(ops[2], (false, &Op::Mark("fsynced-a".into())));
    assert!(matches!(
        ops[3],
        (
            false,
            Op::Write {
                at: 4096,
                bytes: 4096,
                ..
            }
        )
    ));
    assert!(matches!(
        ops[4],
        (
            false,
            Op::Write {
                at: 1024,
                bytes: 512,
                ..
            }
        )
    ));
    assert_eq!(
        ops[5],
        (
            false,
            &Op::Discard {
                at: 8192,
                bytes: 4096
            }
        )
    );
    assert_eq!(
        ops[6],
        (true, &Op::Nothing),
        "the FLUSH stays where it was handed over"
    );
    assert!(matches!(ops[7], (false, Op::Write { at: 12288, .. })));
    if let Op::Write { data_at, .. } = ops[4].1 {
        let mut buf = [0u8; 512];
        log.read_data(*data_at, &mut buf).unwrap();
        assert_eq!(buf, [b'C'; 512]);
    }
}

#[test]
fn a_failed_flush_leaves_a_mark_and_no_flush_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.log");
    let log = DiskLog::create(&path).unwrap();
    let slot = log.flush_handed_over();
    log.flushed(slot, false);
    log.finish();
    let log = LogReader::open(&path).unwrap();
    let entries: Vec<Entry> = log.entries().collect::<Result<_, _>>().unwrap();
    assert_eq!(entries.len(), 1);
    assert!(!entries[0].flush_before);
    assert_eq!(entries[0].op, Op::Mark(FLUSH_FAILED.into()));
}

/// Every state of the sample log, with a copy of its image.
fn states(dir: &Path, samples: u32, seed: u64) -> Vec<(State, Vec<u8>)> {
    let log = LogReader::open(&sample_log(dir)).unwrap();
    let options = Options {
        samples,
        seed,
        max_states: 1000,
        only: None,
    };
    let mut out = Vec::new();
    for_each_state(
        &log,
        &base(dir),
        &dir.join("work"),
        &options,
        |state, image| {
            out.push((state.clone(), std::fs::read(image).unwrap()));
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    out
}

fn block(image: &[u8], n: u64) -> &[u8] {
    &image[(n * BLOCK) as usize..((n + 1) * BLOCK) as usize]
}

#[test]
fn every_flush_point_holds_everything_before_it_and_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let all = states(dir.path(), 0, 1);
    let kinds: Vec<&Kind> = all.iter().map(|(s, _)| &s.kind).collect();
    assert_eq!(
        kinds,
        [&Kind::Start, &Kind::Flush { n: 1 }, &Kind::Flush { n: 2 }]
    );
    let (start, one, two) = (&all[0].1, &all[1].1, &all[2].1);
    assert!(block(start, 0).iter().all(|&b| b == b'z'));
    assert!(block(one, 0).iter().all(|&b| b == b'A'));
    assert!(block(one, 1).iter().all(|&b| b == b'z'));
    // FLUSH point 2: B, C over A's block at 1024..1536, the discarded block zero, and D
    // (logged after the FLUSH was handed over) absent.
    assert!(block(two, 1).iter().all(|&b| b == b'B'));
    assert!(block(two, 0)[1024..1536].iter().all(|&b| b == b'C'));
    assert!(block(two, 0)[..1024].iter().all(|&b| b == b'A'));
    assert!(block(two, 2).iter().all(|&b| b == 0));
    assert!(
        block(two, 3).iter().all(|&b| b == 0),
        "D was written after the FLUSH point"
    );
    // Marks: the start does not rely on fsynced-a; FLUSH point 1 (the one before it) does.
    assert!(all[0].0.marks.is_empty());
    assert_eq!(all[1].0.marks, ["fsynced-a"]);
    assert_eq!(all[2].0.marks, ["fsynced-a"]);
}

#[test]
fn samples_take_any_version_of_each_block_and_repeat_from_their_seed() {
    let dir = tempfile::tempdir().unwrap();
    let all = states(dir.path(), 40, 7);
    let samples: Vec<&(State, Vec<u8>)> = all
        .iter()
        .filter(|(s, _)| matches!(s.kind, Kind::Sample { after: 1, .. }))
        .collect();
    assert_eq!(samples.len(), 40);
    // Between FLUSH points 1 and 2, block 0 is A or A with C; block 1 z or B; block 2 z
    // or zeroes; blocks 3.. untouched.
    let mut seen_block0 = std::collections::BTreeSet::new();
    for (state, image) in &samples {
        assert_eq!(state.blocks.0, 3, "blocks written in the interval");
        let b0 = block(image, 0);
        assert!(b0[..1024].iter().all(|&b| b == b'A'));
        seen_block0.insert(b0[1024]);
        assert!(
            block(image, 1).iter().all(|&b| b == b'z')
                || block(image, 1).iter().all(|&b| b == b'B')
        );
        assert!(
            block(image, 2).iter().all(|&b| b == b'z') || block(image, 2).iter().all(|&b| b == 0)
        );
        assert!(block(image, 3).iter().all(|&b| b == 0));
        assert_eq!(state.marks, ["fsynced-a"]);
    }
    assert_eq!(
        seen_block0,
        [b'A', b'C'].into(),
        "both versions of block 0 appear"
    );
    // The tail after the last FLUSH gets samples too.
    assert!(all.iter().any(|(s, _)| s.kind
        == Kind::Sample {
            after: 2,
            sample: 0
        }));
    // Same seed, same states; another seed, other states.
    let dir2 = tempfile::tempdir().unwrap();
    let again = states(dir2.path(), 40, 7);
    assert!(all.iter().zip(&again).all(|(a, b)| a == b));
    let dir3 = tempfile::tempdir().unwrap();
    let other = states(dir3.path(), 40, 8);
    assert!(all.iter().zip(&other).any(|(a, b)| a.1 != b.1));
    // One state alone, by its number, is the same image.
    let log = LogReader::open(&dir.path().join("disk.log")).unwrap();
    let pick = samples[5].0.number;
    let options = Options {
        samples: 40,
        seed: 7,
        max_states: 1000,
        only: Some(pick),
    };
    let mut alone = None;
    for_each_state(
        &log,
        &base(dir.path()),
        &dir.path().join("w2"),
        &options,
        |s, image| {
            alone = Some((s.clone(), std::fs::read(image).unwrap()));
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(alone.as_ref(), Some(samples[5]));
}

#[test]
fn a_durable_write_is_its_own_flush_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fua.log");
    let f = std::fs::File::create(&path).unwrap();
    let mut block0 = [0u8; 512];
    block0[..28].copy_from_slice(
        &Super {
            nr_entries: 1,
            sectorsize: 512,
        }
        .encode(),
    );
    f.write_all_at(&block0, 0).unwrap();
    let mut entry = [0u8; 512];
    entry[..32].copy_from_slice(
        &Header {
            sector: 0,
            nr_sectors: 8,
            flags: FUA,
            data_len: 0,
        }
        .encode(),
    );
    f.write_all_at(&entry, SECTOR).unwrap();
    f.write_all_at(&[b'F'; 4096], 2 * SECTOR).unwrap();
    let log = LogReader::open(&path).unwrap();
    let options = Options {
        samples: 3,
        seed: 1,
        max_states: 100,
        only: None,
    };
    let mut kinds = Vec::new();
    for_each_state(
        &log,
        &base(dir.path()),
        &dir.path().join("w"),
        &options,
        |s, image| {
            kinds.push((s.kind.clone(), std::fs::read(image).unwrap()[0]));
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(kinds.last(), Some(&(Kind::Flush { n: 1 }, b'F')));
    let _ = FLUSH;
}

#[test]
fn damaged_logs_are_refused_with_where() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_log(dir.path());
    let raw = std::fs::read(&path).unwrap();
    let write = |bytes: &[u8]| {
        let p = dir.path().join("bad.log");
        std::fs::write(&p, bytes).unwrap();
        p
    };
    assert!(matches!(
        LogReader::open(&write(&raw[..10])),
        Err(LogError::NotALog)
    ));
    let mut other = raw.clone();
    other[0] ^= 1;
    assert!(matches!(
        LogReader::open(&write(&other)),
        Err(LogError::NotALog)
    ));
    let mut version = raw.clone();
    version[8] = 2;
    assert!(matches!(
        LogReader::open(&write(&version)),
        Err(LogError::Version(2))
    ));
    let mut sector = raw.clone();
    sector[24..28].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(
        LogReader::open(&write(&sector)),
        Err(LogError::SectorSize(100))
    ));
    // Cut inside the last write's data.
    let cut = LogReader::open(&write(&raw[..raw.len() - 100])).unwrap();
    let err = cut.entries().find_map(Result::err).unwrap();
    assert!(matches!(err, LogError::Truncated { entry: 7, .. }), "{err}");
    // A sector count that overflows.
    let mut huge = raw.clone();
    huge[512 + 8..512 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = LogReader::open(&write(&huge))
        .unwrap()
        .entries()
        .find_map(Result::err)
        .unwrap();
    assert!(matches!(err, LogError::BadEntry { entry: 0, .. }), "{err}");
}

#[test]
fn images_are_copied_with_their_holes() {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("from");
    let f = std::fs::File::create(&from).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    let to = dir.path().join("to");
    copy_image(&from, &to).unwrap();
    assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
}

#[test]
fn a_window_logs_the_pages_changed_since_its_last_flush() {
    use crate::WindowRecorder;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("w.base"), vec![b'o'; 4 * BLOCK as usize]).unwrap();
    let rec = WindowRecorder::create(
        &d.join("w.base"),
        &d.join("w.shadow"),
        &d.join("w.log"),
        4 * BLOCK,
        true,
    )
    .unwrap();
    let window = std::cell::RefCell::new(vec![b'o'; 4 * BLOCK as usize]);
    let read = |at: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&window.borrow()[at as usize..at as usize + buf.len()]);
        Ok(())
    };
    window.borrow_mut()[BLOCK as usize + 7] = b'x';
    window.borrow_mut()[3 * BLOCK as usize] = b'y';
    rec.flushed(read);
    rec.flushed(read);
    rec.log().mark("m");
    window.borrow_mut()[7] = b'z';
    rec.flushed(read);
    rec.log().finish();
    let log = LogReader::open(&d.join("w.log")).unwrap();
    let summary: Vec<String> = log
        .entries()
        .map(|e| match e.unwrap() {
            Entry {
                flush_before: true,
                op: Op::Nothing,
                ..
            } => "flush".to_owned(),
            Entry {
                op: Op::Write { at, bytes, .. },
                ..
            } => format!("page {} ({bytes})", at / BLOCK),
            Entry {
                op: Op::Mark(m), ..
            } => format!("mark {m}"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "page 1 (4096)",
            "page 3 (4096)",
            "flush",
            "flush",
            "mark m",
            "page 0 (4096)",
            "flush"
        ]
    );
}

#[test]
fn a_log_that_does_not_show_every_flush_gets_no_samples() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("w.base"), vec![b'o'; 2 * BLOCK as usize]).unwrap();
    let rec = crate::WindowRecorder::create(
        &d.join("w.base"),
        &d.join("w.shadow"),
        &d.join("w.log"),
        2 * BLOCK,
        false,
    )
    .unwrap();
    let read = |_: u64, buf: &mut [u8]| {
        buf.fill(b'n');
        Ok(())
    };
    rec.flushed(read);
    rec.log().finish();
    let log = LogReader::open(&d.join("w.log")).unwrap();
    let options = Options {
        samples: 5,
        seed: 1,
        max_states: 100,
        only: None,
    };
    let mut kinds = Vec::new();
    for_each_state(
        &log,
        &d.join("w.base"),
        &d.join("work"),
        &options,
        |s, _| {
            kinds.push(s.kind.clone());
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(kinds, [Kind::Start, Kind::Flush { n: 1 }]);
}
