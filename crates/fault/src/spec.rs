//! The rule syntax: what a rule matches, when it fires and what it does, as JSON
//! ([`RuleSpec`] with serde) and as a short command-line form (`key=value,...`, parsed by
//! [`RuleSpec::from_str`] and printed by `Display`). Both forms say the same things; every
//! refusal names the field and what is wrong with it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most sectors a bad-blocks rule may cover (8 GiB): one bit of state each.
pub const MAX_BAD_SECTORS: u64 = 1 << 24;
/// Longest delay a rule may add to a request.
pub const MAX_DELAY: Duration = Duration::from_secs(600);
/// Longest mark name.
pub const MAX_MARK_LEN: usize = 64;

/// The device a rule applies to: `disk` (the virtio-blk device), or the name of a pmem
/// window (its virtio-pmem FLUSHes).
pub const DISK: &str = "disk";

/// One fault rule as a user writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// `disk`, or a pmem window's name.
    #[serde(default = "disk")]
    pub device: String,
    #[serde(default)]
    pub op: OpMatch,
    /// Sectors `[start, end)` of the disk a request must touch; none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sectors: Option<[u64; 2]>,
    /// The queue a request must come from; none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u16>,
    #[serde(default)]
    pub when: When,
    /// A mark (`daxd mark NAME`) before which the rule does nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    pub action: Action,
}

fn disk() -> String {
    DISK.to_owned()
}

/// Which requests a rule matches, by operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpMatch {
    #[default]
    Any,
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    /// A virtio-pmem FLUSH (a guest's fsync on a DAX file system).
    PmemFlush,
}

/// When a matching request is acted on. Counting is per rule, over the requests it
/// matched (after its mark, if it has one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    #[default]
    Always,
    /// The first match only.
    Once,
    /// The Nth match only (from 1).
    Nth(u64),
    /// Every Nth match: the Nth, 2Nth, ...
    Every(u64),
    /// The first N matches.
    Times(u64),
    /// Each match with probability `p`, decided by a hash of `seed` and the match's
    /// number: the same requests in the same order meet the same decisions.
    Probability { p: f64, seed: u64 },
}

/// What the rule does to a request it acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Complete with this status without touching the region.
    Fail(Status),
    /// Complete this many milliseconds late (the queue serves other requests meanwhile).
    DelayMs(u64),
    /// Complete only once the rule is cleared (or the queue stops).
    Hold,
    /// Complete a write, discard or write-zeroes as done without storing anything (a lost
    /// write); a FLUSH as done without flushing.
    Drop,
    /// XOR byte `offset` of the rule's sectors (of the disk without sectors) with `mask`
    /// in what a read returns or a write stores, whenever a request covers it.
    Corrupt { offset: u64, mask: u8 },
    /// dm-dust: every sector of the rule's range starts bad; a read touching a bad sector
    /// fails with an I/O error; a write (or discard, write-zeroes) makes its sectors good.
    BadBlocks,
}

/// A failure status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ioerr,
    Unsupp,
}

/// Why a rule is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("`{0}` is not key=value (e.g. op=read)")]
    NotKeyValue(String),
    #[error("unknown key `{0}`; keys: device, op, sectors, queue, when, seed, after, action")]
    UnknownKey(String),
    #[error("key `{0}` is given twice")]
    Twice(String),
    #[error("no action: say what the rule does, e.g. action=fail")]
    NoAction,
    #[error("{key}: `{value}` is not {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("sectors {0}..{1}: the range is empty (the end is exclusive)")]
    EmptyRange(u64, u64),
    #[error("when: {0} must be at least 1")]
    ZeroCount(&'static str),
    #[error("when: probability {0} is not between 0 and 1")]
    Probability(f64),
    #[error("seed is only for when=probability")]
    SeedWithoutProbability,
    #[error("action {action} does not apply to {op} requests{hint}")]
    ActionOp {
        action: &'static str,
        op: &'static str,
        hint: &'static str,
    },
    #[error("bad-blocks needs sectors=START..END (at most {MAX_BAD_SECTORS} sectors)")]
    BadBlocksRange,
    #[error("a delay of {0:?} is longer than the {MAX_DELAY:?} a rule may add")]
    DelayTooLong(Duration),
    #[error("device {device}: a pmem window's rules match op=pmem-flush only{hint}")]
    PmemOp { device: String, hint: &'static str },
    #[error("op=pmem-flush applies to a pmem window: give device=WINDOW")]
    PmemFlushOnDisk,
    #[error("after: a mark name is 1 to {MAX_MARK_LEN} letters, digits, '-', '_' or '.'")]
    MarkName,
    #[error("device: `{0}` is not disk or a window name")]
    DeviceName(String),
    #[error("not a rule in JSON: {0}")]
    Json(String),
}

impl OpMatch {
    pub fn name(self) -> &'static str {
        match self {
            OpMatch::Any => "any",
            OpMatch::Read => "read",
            OpMatch::Write => "write",
            OpMatch::Flush => "flush",
            OpMatch::Discard => "discard",
            OpMatch::WriteZeroes => "write-zeroes",
            OpMatch::GetId => "get-id",
            OpMatch::PmemFlush => "pmem-flush",
        }
    }

    const ALL: [OpMatch; 8] = [
        OpMatch::Any,
        OpMatch::Read,
        OpMatch::Write,
        OpMatch::Flush,
        OpMatch::Discard,
        OpMatch::WriteZeroes,
        OpMatch::GetId,
        OpMatch::PmemFlush,
    ];
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Fail(_) => "fail",
            Action::DelayMs(_) => "delay",
            Action::Hold => "hold",
            Action::Drop => "drop",
            Action::Corrupt { .. } => "corrupt",
            Action::BadBlocks => "bad-blocks",
        }
    }
}

/// A mark name: short, and printable in a log line and a file name.
pub fn valid_mark(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MARK_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl RuleSpec {
    /// A rule in either form: JSON if it starts with `{`, else the short form.
    pub fn parse(text: &str) -> Result<RuleSpec, RuleError> {
        let text = text.trim();
        let spec = if text.starts_with('{') {
            serde_json::from_str(text).map_err(|e| RuleError::Json(e.to_string()))?
        } else {
            parse_short(text)?
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks that the fields make sense together (the JSON form is checked here too).
    pub fn check(&self) -> Result<(), RuleError> {
        let op = self.op;
        let refuse = |hint: &'static str| {
            Err(RuleError::ActionOp {
                action: self.action.name(),
                op: op.name(),
                hint,
            })
        };
        if !valid_mark(&self.device) {
            return Err(RuleError::DeviceName(self.device.clone()));
        }
        if let Some(mark) = &self.after {
            if !valid_mark(mark) {
                return Err(RuleError::MarkName);
            }
        }
        if let Some([start, end]) = self.sectors {
            if start >= end {
                return Err(RuleError::EmptyRange(start, end));
            }
        }
        match self.when {
            When::Nth(0) => return Err(RuleError::ZeroCount("nth")),
            When::Every(0) => return Err(RuleError::ZeroCount("every")),
            When::Times(0) => return Err(RuleError::ZeroCount("times")),
            When::Probability { p, .. } if !(0.0..=1.0).contains(&p) => {
                return Err(RuleError::Probability(p))
            }
            _ => {}
        }
        let pmem = self.device != DISK;
        if pmem {
            if !matches!(op, OpMatch::Any | OpMatch::PmemFlush) {
                return Err(RuleError::PmemOp {
                    device: self.device.clone(),
                    hint: "",
                });
            }
            if self.sectors.is_some() || self.queue.is_some() {
                return Err(RuleError::PmemOp {
                    device: self.device.clone(),
                    hint: " (without sectors or queue: a virtio-pmem FLUSH covers the window)",
                });
            }
            return match self.action {
                Action::Fail(_) | Action::Drop => Ok(()),
                _ => refuse(" (a pmem window's FLUSH can fail or be dropped)"),
            };
        }
        if op == OpMatch::PmemFlush {
            return Err(RuleError::PmemFlushOnDisk);
        }
        match self.action {
            Action::Fail(_) | Action::Hold => Ok(()),
            Action::DelayMs(ms) => {
                let delay = Duration::from_millis(ms);
                if delay > MAX_DELAY {
                    return Err(RuleError::DelayTooLong(delay));
                }
                Ok(())
            }
            Action::Drop => match op {
                OpMatch::Any
                | OpMatch::Write
                | OpMatch::Flush
                | OpMatch::Discard
                | OpMatch::WriteZeroes => Ok(()),
                _ => refuse(" (drop loses writes, discards, write-zeroes and FLUSHes)"),
            },
            Action::Corrupt { .. } => match op {
                OpMatch::Any | OpMatch::Read | OpMatch::Write => Ok(()),
                _ => refuse(" (corrupt changes what reads return or writes store)"),
            },
            Action::BadBlocks => {
                if !matches!(op, OpMatch::Any | OpMatch::Read) {
                    return refuse(
                        " (bad blocks fail reads and are healed by writes: leave op out)",
                    );
                }
                match self.sectors {
                    Some([start, end]) if end - start <= MAX_BAD_SECTORS => Ok(()),
                    _ => Err(RuleError::BadBlocksRange),
                }
            }
        }
    }
}

impl FromStr for RuleSpec {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<RuleSpec, RuleError> {
        RuleSpec::parse(text)
    }
}

fn bad(key: &'static str, value: &str, expected: &'static str) -> RuleError {
    RuleError::BadValue {
        key,
        value: value.to_owned(),
        expected,
    }
}

fn number(key: &'static str, value: &str) -> Result<u64, RuleError> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| bad(key, value, "a number"))
}

fn parse_short(text: &str) -> Result<RuleSpec, RuleError> {
    let mut seen: Vec<&str> = Vec::new();
    let mut spec = RuleSpec {
        device: DISK.to_owned(),
        op: OpMatch::Any,
        sectors: None,
        queue: None,
        when: When::Always,
        after: None,
        action: Action::Hold,
    };
    let mut action = None;
    let mut seed = None;
    for field in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| RuleError::NotKeyValue(field.to_owned()))?;
        let (key, value) = (key.trim(), value.trim());
        if seen.contains(&key) {
            return Err(RuleError::Twice(key.to_owned()));
        }
        seen.push(key);
        match key {
            "device" => spec.device = value.to_owned(),
            "op" => {
                let wanted = value.replace('_', "-");
                spec.op = OpMatch::ALL
                    .into_iter()
                    .find(|op| op.name() == wanted)
                    .ok_or_else(|| {
                        bad(
                            "op",
                            value,
                            "any, read, write, flush, discard, write-zeroes, get-id or pmem-flush",
                        )
                    })?;
            }
            "sectors" => {
                let expected = "START..END (end exclusive) or one SECTOR";
                spec.sectors = Some(match value.split_once("..") {
                    Some((start, end)) => [
                        number("sectors", start).map_err(|_| bad("sectors", value, expected))?,
                        number("sectors", end).map_err(|_| bad("sectors", value, expected))?,
                    ],
                    None => {
                        let sector = number("sectors", value)
                            .map_err(|_| bad("sectors", value, expected))?;
                        [sector, sector.saturating_add(1)]
                    }
                });
            }
            "queue" => {
                spec.queue = Some(
                    value
                        .parse()
                        .map_err(|_| bad("queue", value, "a queue number"))?,
                )
            }
            "when" => spec.when = parse_when(value)?,
            "seed" => seed = Some(number("seed", value)?),
            "after" => spec.after = Some(value.to_owned()),
            "action" => action = Some(parse_action(value)?),
            other => return Err(RuleError::UnknownKey(other.to_owned())),
        }
    }
    spec.action = action.ok_or(RuleError::NoAction)?;
    match (&mut spec.when, seed) {
        (When::Probability { seed: s, .. }, Some(seed)) => *s = seed,
        (_, Some(_)) => return Err(RuleError::SeedWithoutProbability),
        _ => {}
    }
    Ok(spec)
}

fn parse_when(value: &str) -> Result<When, RuleError> {
    let expected = "always, once, nth:N, every:N, times:N or probability:P";
    let (kind, arg) = value.split_once(':').unwrap_or((value, ""));
    let count = || number("when", arg).map_err(|_| bad("when", value, expected));
    Ok(match (kind, arg.is_empty()) {
        ("always", true) => When::Always,
        ("once", true) => When::Once,
        ("nth", false) => When::Nth(count()?),
        ("every", false) => When::Every(count()?),
        ("times", false) => When::Times(count()?),
        ("probability" | "p", false) => When::Probability {
            p: arg.parse().map_err(|_| bad("when", value, expected))?,
            seed: 0,
        },
        _ => return Err(bad("when", value, expected)),
    })
}

fn parse_action(value: &str) -> Result<Action, RuleError> {
    let expected = "fail[:ioerr|:unsupp], delay:TIME (e.g. 20ms, 1s), hold, drop, corrupt[:OFFSET[:MASK]] or bad-blocks";
    let (kind, arg) = value.split_once(':').unwrap_or((value, ""));
    Ok(match (kind, arg) {
        ("fail", "" | "ioerr") => Action::Fail(Status::Ioerr),
        ("fail", "unsupp") => Action::Fail(Status::Unsupp),
        ("delay", time) => Action::DelayMs(parse_millis(time).ok_or_else(|| {
            bad(
                "action",
                value,
                "delay:TIME with TIME like 500us, 20ms or 2s (whole milliseconds)",
            )
        })?),
        ("hold", "") => Action::Hold,
        ("drop", "") => Action::Drop,
        ("corrupt", arg) => {
            let (offset, mask) = match arg.split_once(':') {
                Some((offset, mask)) => (offset, Some(mask)),
                None => (arg, None),
            };
            let offset = if offset.is_empty() {
                0
            } else {
                number("action", offset).map_err(|_| bad("action", value, expected))?
            };
            let mask = match mask {
                None => 0xff,
                Some(mask) => number("action", mask)
                    .ok()
                    .and_then(|m| u8::try_from(m).ok())
                    .filter(|&m| m != 0)
                    .ok_or_else(|| {
                        bad("action", value, "corrupt:OFFSET:MASK with MASK 1 to 255")
                    })?,
            };
            Action::Corrupt { offset, mask }
        }
        ("bad-blocks" | "bad_blocks", "") => Action::BadBlocks,
        _ => return Err(bad("action", value, expected)),
    })
}

/// Milliseconds in `20ms`, `2s` or `1000us` (a whole number of milliseconds).
fn parse_millis(time: &str) -> Option<u64> {
    let (digits, unit) = time.split_at(time.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "us" if n % 1000 == 0 => Some(n / 1000),
        _ => None,
    }
}

impl fmt::Display for RuleSpec {
    /// The short form, with every field that differs from its default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.device != DISK {
            write!(f, "device={},", self.device)?;
        }
        if self.op != OpMatch::Any {
            write!(f, "op={},", self.op.name())?;
        }
        if let Some([start, end]) = self.sectors {
            write!(f, "sectors={start}..{end},")?;
        }
        if let Some(queue) = self.queue {
            write!(f, "queue={queue},")?;
        }
        match self.when {
            When::Always => {}
            When::Once => write!(f, "when=once,")?,
            When::Nth(n) => write!(f, "when=nth:{n},")?,
            When::Every(n) => write!(f, "when=every:{n},")?,
            When::Times(n) => write!(f, "when=times:{n},")?,
            When::Probability { p, seed } => write!(f, "when=probability:{p},seed={seed},")?,
        }
        if let Some(mark) = &self.after {
            write!(f, "after={mark},")?;
        }
        match self.action {
            Action::Fail(Status::Ioerr) => write!(f, "action=fail"),
            Action::Fail(Status::Unsupp) => write!(f, "action=fail:unsupp"),
            Action::DelayMs(ms) => write!(f, "action=delay:{ms}ms"),
            Action::Hold => write!(f, "action=hold"),
            Action::Drop => write!(f, "action=drop"),
            Action::Corrupt { offset, mask } => write!(f, "action=corrupt:{offset}:{mask:#x}"),
            Action::BadBlocks => write!(f, "action=bad-blocks"),
        }
    }
}
