//! The crash states a write log allows, materialized one at a time as image files.
//!
//! The log is cut at its FLUSH points. A FLUSH point's state holds everything logged
//! before it. Between two FLUSH points (and after the last one) the page cache may have
//! written back any of the blocks written since the earlier point, each with any of the
//! versions written to it, in any order: a sampled state takes the earlier point's state
//! and gives every such 4 KiB block one of its versions or its old content, chosen by a
//! seeded generator, so a state is reproduced from its number and the seed alone.
//!
//! Marks travel with the states: a mark set after a guest's `fsync` returned says that
//! the FLUSH the `fsync` waited for is logged before it, so every state from the last
//! FLUSH point before the mark on must show what the `fsync` made durable. A state
//! carries the marks logged before the next FLUSH point after the ones it includes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::reader::{LogReader, Op};
use crate::{LogError, BLOCK};

/// What a state is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The disk as recording began.
    Start,
    /// FLUSH point `n` (from 1): everything logged before the `n`th FLUSH.
    Flush { n: u64 },
    /// Sample `sample` of the blocks written after FLUSH point `after` (0: after the start).
    Sample { after: u64, sample: u32 },
}

/// A state, as its checker is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Its number in the run, from 0.
    pub number: u64,
    pub kind: Kind,
    /// Log entries fully included (those before the entry with this number).
    pub entries: u64,
    /// Blocks written after the last included FLUSH point and their versions in this
    /// state: (blocks, how many of them hold a new version).
    pub blocks: (u64, u64),
    /// The marks that apply (see the module's documentation).
    pub marks: Vec<String>,
}

/// How many states, and which.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sampled states between two FLUSH points (none where nothing was written).
    pub samples: u32,
    pub seed: u64,
    /// Stop after this many states.
    pub max_states: u64,
    /// Make only the state with this number (the others are walked, not written).
    pub only: Option<u64>,
}

/// Why states cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum StatesError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot make a state in {dir}")]
    Work {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the recording has no state {0} with these --samples")]
    NoSuchState(u64),
    #[error("entry {entry} writes bytes {at}+{bytes}, beyond the {size}-byte disk the log was recorded on")]
    BeyondDisk {
        entry: u64,
        at: u64,
        bytes: u64,
        size: u64,
    },
}

/// Versions of the blocks written since the last FLUSH point, oldest first.
type Versions = BTreeMap<u64, Vec<Box<[u8]>>>;

/// A log entry cut into what a crash state cares about.
#[derive(Debug)]
enum Event {
    /// Everything before is durable.
    Flush,
    /// An operation of entry `entry`.
    Op {
        entry: u64,
        op: Op,
    },
    Mark(String),
}

/// FLUSH points around operations: a FLUSH entry's own write comes after its point, a
/// durable (FUA) write is followed by one (which may leave out states, never make one
/// that cannot happen).
fn events(log: &LogReader) -> Result<Vec<Event>, LogError> {
    let mut events = Vec::new();
    for entry in log.entries() {
        let entry = entry?;
        if entry.flush_before {
            events.push(Event::Flush);
        }
        match entry.op {
            Op::Nothing => {}
            Op::Mark(name) => events.push(Event::Mark(name)),
            op => events.push(Event::Op {
                entry: entry.index,
                op,
            }),
        }
        if entry.durable {
            events.push(Event::Flush);
        }
    }
    Ok(events)
}

/// Makes each state of `log` (over `base`, the disk as recording began) as the file
/// `work/state.img` in turn and calls `visit` with it; stops early when `visit` says so.
/// Returns the number of states made.
pub fn for_each_state(
    log: &LogReader,
    base: &Path,
    work: &Path,
    options: &Options,
    mut visit: impl FnMut(&State, &Path) -> ControlFlow<()>,
) -> Result<u64, StatesError> {
    let work_error = |source| StatesError::Work {
        dir: work.to_owned(),
        source,
    };
    std::fs::create_dir_all(work).map_err(work_error)?;
    let prefix_path = work.join("prefix.img");
    let state_path = work.join("state.img");
    copy_image(base, &prefix_path).map_err(work_error)?;
    let prefix = File::options()
        .read(true)
        .write(true)
        .open(&prefix_path)
        .map_err(work_error)?;
    let size = prefix.metadata().map_err(work_error)?.len();

    let events = events(log)?;
    let samples = if events
        .iter()
        .any(|e| matches!(e, Event::Mark(name) if name == crate::NO_SAMPLES))
    {
        0
    } else {
        options.samples
    };
    // Interval k: the events after FLUSH point k (0: the start) up to the next one.
    let mut intervals: Vec<&[Event]> = events.split(|e| matches!(e, Event::Flush)).collect();
    if intervals.is_empty() {
        intervals.push(&[]);
    }
    // What states from FLUSH point k on may rely on: the marks before FLUSH point k + 1.
    let mut marks_from: Vec<Vec<String>> = Vec::with_capacity(intervals.len());
    for interval in &intervals {
        let mut marks = marks_from.last().cloned().unwrap_or_default();
        marks.extend(interval.iter().filter_map(|e| match e {
            Event::Mark(name) => Some(name.clone()),
            _ => None,
        }));
        marks_from.push(marks);
    }

    let mut made = 0u64;
    let mut emit = |kind: Kind,
                    entries: u64,
                    marks: &[String],
                    versions: Option<&Versions>|
     -> Result<bool, StatesError> {
        let number = made;
        made += 1;
        if options.only.is_some_and(|only| only != number) {
            return Ok(made < options.max_states);
        }
        copy_image(&prefix_path, &state_path).map_err(work_error)?;
        let mut blocks = (0, 0);
        if let Some(versions) = versions {
            let out = File::options()
                .write(true)
                .open(&state_path)
                .map_err(work_error)?;
            let mut rng = Rng::new(options.seed, number);
            blocks.0 = versions.len() as u64;
            for (block, list) in versions {
                let pick = rng.below(list.len() as u64 + 1);
                if pick > 0 {
                    blocks.1 += 1;
                    out.write_all_at(&list[pick as usize - 1], block * BLOCK)
                        .map_err(work_error)?;
                }
            }
        }
        let state = State {
            number,
            kind,
            entries,
            blocks,
            marks: marks.to_vec(),
        };
        Ok(visit(&state, &state_path).is_continue() && made < options.max_states)
    };

    if !emit(Kind::Start, 0, &marks_from[0], None)? {
        return Ok(made);
    }
    let mut entries = 0u64;
    for (k, interval) in intervals.iter().enumerate() {
        let mut versions = Versions::new();
        for event in interval.iter() {
            if let Event::Op { entry, op } = event {
                apply(log, &prefix, size, *entry, op, &mut versions)?;
                entries = entry + 1;
            }
        }
        if !versions.is_empty() {
            for sample in 0..samples {
                let kind = Kind::Sample {
                    after: k as u64,
                    sample,
                };
                let before = entries_before(interval, entries);
                if !emit(kind, before, &marks_from[k], Some(&versions))? {
                    return Ok(made);
                }
            }
        }
        for (block, list) in &versions {
            if let Some(last) = list.last() {
                prefix
                    .write_all_at(last, block * BLOCK)
                    .map_err(work_error)?;
            }
        }
        if k + 1 < intervals.len() {
            let n = k as u64 + 1;
            if !emit(Kind::Flush { n }, entries, &marks_from[k + 1], None)? {
                return Ok(made);
            }
        }
    }
    Ok(made)
}

/// The log entries before an interval whose operations end at `through`.
fn entries_before(interval: &[Event], through: u64) -> u64 {
    interval
        .iter()
        .find_map(|e| match e {
            Event::Op { entry, .. } => Some(*entry),
            _ => None,
        })
        .unwrap_or(through)
}

/// Adds the versions `op` (entry `entry`) gives the blocks it touches: each block's
/// content after it, read from the newest version so far or from `prefix`.
fn apply(
    log: &LogReader,
    prefix: &File,
    size: u64,
    entry: u64,
    op: &Op,
    versions: &mut Versions,
) -> Result<(), StatesError> {
    let (at, bytes, data_at) = match *op {
        Op::Write { at, bytes, data_at } => (at, bytes, Some(data_at)),
        Op::Discard { at, bytes } => (at, bytes, None),
        Op::Nothing | Op::Mark(_) => return Ok(()),
    };
    if at.checked_add(bytes).is_none_or(|end| end > size) {
        return Err(StatesError::BeyondDisk {
            entry,
            at,
            bytes,
            size,
        });
    }
    let mut done = 0;
    while done < bytes {
        let pos = at + done;
        let block = pos / BLOCK;
        let within = (pos % BLOCK) as usize;
        let n = (BLOCK as usize - within).min((bytes - done) as usize);
        let mut content: Box<[u8]> = match versions.get(&block).and_then(|l| l.last()) {
            Some(last) => last.clone(),
            None => {
                let mut old = vec![0u8; BLOCK as usize].into_boxed_slice();
                let want = (size - block * BLOCK).min(BLOCK) as usize;
                prefix
                    .read_exact_at(&mut old[..want], block * BLOCK)
                    .map_err(LogError::Io)?;
                old
            }
        };
        match data_at {
            Some(data_at) => log.read_data(data_at + done, &mut content[within..within + n])?,
            None => content[within..within + n].fill(0),
        }
        versions.entry(block).or_default().push(content);
        done += n as u64;
    }
    Ok(())
}

/// Copies the image at `from` to `to`: a reflink where the file system has them, else a
/// copy of its data extents (holes stay holes).
pub fn copy_image(from: &Path, to: &Path) -> io::Result<()> {
    let src = File::open(from)?;
    let dst = File::create(to)?;
    if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
        return Ok(());
    }
    let len = src.metadata()?.len();
    copy_extents(&src, 0, len, &dst)
}

/// Copies `len` bytes of the file at `from` from byte `offset` on into a new file `to`,
/// holes kept.
pub fn copy_range(from: &Path, offset: u64, len: u64, to: &Path) -> io::Result<()> {
    let src = File::open(from)?;
    let dst = File::create(to)?;
    copy_extents(&src, offset, len, &dst)
}

/// Copies the data extents of `src`'s bytes `offset..offset + len` to `dst` from byte 0.
fn copy_extents(src: &File, offset: u64, len: u64, dst: &File) -> io::Result<()> {
    dst.set_len(len)?;
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(at)) {
            Ok(data) if data < end => data,
            // No data after `at`.
            Ok(_) | Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data))?.min(end);
        let mut from_at = data;
        let mut to_at = data - offset;
        while from_at < hole {
            let want = (hole - from_at) as usize;
            let n =
                rustix::fs::copy_file_range(src, Some(&mut from_at), dst, Some(&mut to_at), want)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        at = hole;
    }
    Ok(())
}

/// A small seeded generator (SplitMix64): a state's choices follow from the run's seed and
/// the state's number alone.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, state: u64) -> Rng {
        Rng(seed ^ state.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
