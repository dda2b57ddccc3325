//! Storage that fails on purpose: fault rules for daxd's disk and pmem windows, set at
//! start (`--fault`) or at run time (the control socket), without sockets of their own.
//!
//! A device asks [`Faults::check`] about each request it is about to execute and does what
//! the [`Verdict`] says: execute it, fail it, drop it, corrupt a byte, or complete it later.
//! With no rule set, the check is one relaxed load. Rules are matched in the order they
//! were added; the first that acts on a request decides, and later rules do not see it
//! (their `when` does not count it). Bad-blocks rules are the exception: a write heals the
//! sectors it touches whether or not another rule acts on it.

pub mod spec;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub use spec::{Action, OpMatch, RuleError, RuleSpec, Status, When, DISK};

/// A request as rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    pub op: Op,
    pub queue: u16,
    /// Disk sectors `[start, end)` the request touches; empty for FLUSH and GET_ID.
    pub sectors: [u64; 2],
}

/// A request's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    PmemFlush,
}

impl Op {
    fn matched_by(self, op: OpMatch) -> bool {
        matches!(
            (op, self),
            (OpMatch::Any, _)
                | (OpMatch::Read, Op::Read)
                | (OpMatch::Write, Op::Write)
                | (OpMatch::Flush, Op::Flush)
                | (OpMatch::Discard, Op::Discard)
                | (OpMatch::WriteZeroes, Op::WriteZeroes)
                | (OpMatch::GetId, Op::GetId)
                | (OpMatch::PmemFlush, Op::PmemFlush)
        )
    }

    /// Whether the request changes the device's bytes.
    pub fn writes(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// What a device does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Execute it as usual.
    Pass,
    /// Complete it with this status; execute nothing.
    Fail(Status),
    /// Complete it as done; execute nothing.
    Drop,
    /// Execute it, with device byte `at` (from sector 0) XORed with `mask` in what a read
    /// returns or a write stores.
    Corrupt { at: u64, mask: u8 },
    /// Execute it, and complete it once `Release` says so.
    Later(Release),
}

/// When a request executed now may be completed: plain data, so that a request that no
/// rule touched carries nothing to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    At(Instant),
    /// When rule `id` (which holds it) is cleared; [`Faults::due`] tells.
    WhenCleared(u64),
}

impl Release {
    /// The time at which it is due, if it is a time.
    pub fn at(&self) -> Option<Instant> {
        match self {
            Release::At(at) => Some(*at),
            Release::WhenCleared(_) => None,
        }
    }
}

/// A rule as listed: its number, its text, and how often it acted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub id: u64,
    /// The rule in the short form.
    pub rule: String,
    pub spec: RuleSpec,
    /// Requests it acted on (for bad blocks: reads it failed).
    pub hits: u64,
    /// Requests it matched, acted on or not (what `when` counts).
    pub matched: u64,
    /// Whether its mark was set (always true without one).
    pub armed: bool,
    /// Bad-blocks rules: sectors still bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_sectors: Option<u64>,
}

#[derive(Debug)]
struct Rule {
    id: u64,
    spec: RuleSpec,
    hits: AtomicU64,
    matched: AtomicU64,
    armed: AtomicBool,
    bad: Option<BadSectors>,
}

/// The set of bad sectors of a bad-blocks rule: a bit per sector of its range.
#[derive(Debug)]
struct BadSectors {
    start: u64,
    bits: Box<[AtomicU64]>,
}

impl BadSectors {
    fn new([start, end]: [u64; 2]) -> BadSectors {
        let n = end - start;
        let bits: Box<[AtomicU64]> = (0..n.div_ceil(64))
            .map(|word| {
                let left = n - word * 64;
                AtomicU64::new(if left >= 64 {
                    u64::MAX
                } else {
                    (1 << left) - 1
                })
            })
            .collect();
        BadSectors { start, bits }
    }

    fn end(&self) -> u64 {
        self.start + self.bits.len() as u64 * 64
    }

    /// Sector indexes (from `start`) of `sectors` inside the range.
    fn overlap(&self, [start, end]: [u64; 2]) -> std::ops::Range<u64> {
        let from = start.max(self.start);
        let to = end.min(self.end());
        if from >= to {
            return 0..0;
        }
        from - self.start..to - self.start
    }

    fn any_bad(&self, sectors: [u64; 2]) -> bool {
        self.overlap(sectors)
            .any(|i| self.bits[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    fn heal(&self, sectors: [u64; 2]) {
        for i in self.overlap(sectors) {
            self.bits[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
        }
    }

    fn count(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Why a rule cannot be added, or a mark set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("device {device}: daxd serves no such device here (devices: {known})")]
    UnknownDevice { device: String, known: String },
    #[error("no rule {0}")]
    NoRule(u64),
    #[error("`{0}` is not a mark name: 1 to 64 letters, digits, '-', '_' or '.'")]
    MarkName(String),
}

/// The fault rules of one daxd: shared by its disk and its pmem windows.
#[derive(Debug)]
pub struct Faults {
    /// Whether any rule is set: the one load a request pays when none is.
    any: AtomicBool,
    rules: ArcSwap<Vec<Arc<Rule>>>,
    /// Changes to the rules, one at a time.
    change: Mutex<Changes>,
    /// The devices rules may name: `disk` and the pmem windows.
    devices: Vec<String>,
}

#[derive(Debug, Default)]
struct Changes {
    next_id: u64,
    marks: BTreeSet<String>,
}

impl Faults {
    /// Rules for a daxd serving `devices` (`disk` for the disk, the pmem windows' names).
    pub fn new(devices: Vec<String>) -> Faults {
        Faults {
            any: AtomicBool::new(false),
            rules: ArcSwap::default(),
            change: Mutex::new(Changes {
                next_id: 1,
                marks: BTreeSet::new(),
            }),
            devices,
        }
    }

    fn changes(&self) -> std::sync::MutexGuard<'_, Changes> {
        self.change.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a rule; returns its number.
    pub fn add(&self, spec: RuleSpec) -> Result<u64, FaultError> {
        spec.check()?;
        if !self.devices.contains(&spec.device) {
            return Err(FaultError::UnknownDevice {
                device: spec.device,
                known: self.devices.join(", "),
            });
        }
        let mut changes = self.changes();
        let id = changes.next_id;
        changes.next_id += 1;
        let armed = spec
            .after
            .as_ref()
            .is_none_or(|mark| changes.marks.contains(mark));
        let bad = match (spec.action, spec.sectors) {
            (Action::BadBlocks, Some(range)) => Some(BadSectors::new(range)),
            _ => None,
        };
        let rule = Arc::new(Rule {
            id,
            spec,
            hits: AtomicU64::new(0),
            matched: AtomicU64::new(0),
            armed: AtomicBool::new(armed),
            bad,
        });
        let mut rules = Vec::clone(&self.rules.load());
        rules.push(rule);
        self.rules.store(Arc::new(rules));
        self.any.store(true, Ordering::Release);
        Ok(id)
    }

    /// Removes rule `id`, or every rule; requests they hold are released. Returns how
    /// many were removed.
    pub fn clear(&self, id: Option<u64>) -> Result<usize, FaultError> {
        let _changes = self.changes();
        let rules = self.rules.load_full();
        let (gone, kept): (Vec<_>, Vec<_>) = rules
            .iter()
            .cloned()
            .partition(|rule| id.is_none_or(|id| rule.id == id));
        if let (Some(id), true) = (id, gone.is_empty()) {
            return Err(FaultError::NoRule(id));
        }
        self.any.store(!kept.is_empty(), Ordering::Release);
        self.rules.store(Arc::new(kept));
        Ok(gone.len())
    }

    /// The rules, in the order they apply.
    pub fn list(&self) -> Vec<RuleInfo> {
        self.rules
            .load()
            .iter()
            .map(|rule| RuleInfo {
                id: rule.id,
                rule: rule.spec.to_string(),
                spec: rule.spec.clone(),
                hits: rule.hits.load(Ordering::Relaxed),
                matched: rule.matched.load(Ordering::Relaxed),
                armed: rule.armed.load(Ordering::Relaxed),
                bad_sectors: rule.bad.as_ref().map(BadSectors::count),
            })
            .collect()
    }

    /// Sets mark `name`: rules that wait for it act from now on. Marking twice is fine.
    pub fn mark(&self, name: &str) -> Result<(), FaultError> {
        if !spec::valid_mark(name) {
            return Err(FaultError::MarkName(name.to_owned()));
        }
        let mut changes = self.changes();
        changes.marks.insert(name.to_owned());
        for rule in self.rules.load().iter() {
            if rule.spec.after.as_deref() == Some(name) {
                rule.armed.store(true, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Whether a request executed with `release` may be completed at `now`. Rule numbers
    /// are never reused, so a rule that is gone was cleared.
    pub fn due(&self, release: &Release, now: Instant) -> bool {
        match *release {
            Release::At(at) => at <= now,
            Release::WhenCleared(id) => !self.rules.load().iter().any(|rule| rule.id == id),
        }
    }

    /// Whether any rule is set: a device that finds none need not describe its request
    /// (one relaxed load).
    #[inline]
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// What `device` (`disk` or a pmem window's name) does with `io`.
    #[inline]
    pub fn check(&self, device: &str, io: &Io) -> Verdict {
        if !self.any() {
            return Verdict::Pass;
        }
        self.check_rules(device, io)
    }

    #[cold]
    fn check_rules(&self, device: &str, io: &Io) -> Verdict {
        let rules = self.rules.load();
        let mut verdict = Verdict::Pass;
        for rule in rules.iter() {
            let spec = &rule.spec;
            if spec.device != device
                || !io.op.matched_by(spec.op)
                || spec.queue.is_some_and(|q| q != io.queue)
                || !rule.armed.load(Ordering::Acquire)
            {
                continue;
            }
            if let Some([start, end]) = spec.sectors {
                let [io_start, io_end] = io.sectors;
                if io_start >= end || start >= io_end {
                    continue;
                }
            }
            if let Some(bad) = &rule.bad {
                // dm-dust: a write makes its sectors good; a read of a bad one fails.
                if io.op.writes() {
                    bad.heal(io.sectors);
                    continue;
                }
                if io.op != Op::Read || !bad.any_bad(io.sectors) {
                    continue;
                }
            }
            let corrupt_at = match spec.action {
                Action::Corrupt { offset, .. } => {
                    let at = spec.sectors.map_or(0, |[start, _]| start * 512) + offset;
                    let [io_start, io_end] = io.sectors;
                    if !(io_start * 512..io_end * 512).contains(&at) {
                        continue;
                    }
                    at
                }
                _ => 0,
            };
            if verdict != Verdict::Pass {
                // Already decided; later bad-blocks rules still heal.
                continue;
            }
            let n = rule.matched.fetch_add(1, Ordering::Relaxed) + 1;
            if !fires(spec.when, n) {
                continue;
            }
            rule.hits.fetch_add(1, Ordering::Relaxed);
            verdict = match spec.action {
                Action::Fail(status) => Verdict::Fail(status),
                Action::BadBlocks => Verdict::Fail(Status::Ioerr),
                Action::Drop => Verdict::Drop,
                Action::Corrupt { mask, .. } => Verdict::Corrupt {
                    at: corrupt_at,
                    mask,
                },
                Action::DelayMs(ms) => {
                    Verdict::Later(Release::At(Instant::now() + Duration::from_millis(ms)))
                }
                Action::Hold => Verdict::Later(Release::WhenCleared(rule.id)),
            };
        }
        verdict
    }
}

/// Whether the `n`th match (from 1) of a rule acts.
fn fires(when: When, n: u64) -> bool {
    match when {
        When::Always => true,
        When::Once => n == 1,
        When::Nth(k) => n == k,
        When::Every(k) => n % k == 0,
        When::Times(k) => n <= k,
        When::Probability { p, seed } => {
            // splitmix64 of the seed and the match number: reproducible, no state.
            let mut z = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64) < p
        }
    }
}

#[cfg(test)]
mod tests;
