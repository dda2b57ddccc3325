//! The power-cut suite's blocks and its verdict. `daxd-cut-client` writes self-describing
//! 4 KiB blocks and prints what daxd acknowledged; after a cut, [`check`] compares the
//! region file with those acknowledgements.

/// Bytes per block.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"DAXDCUT1";

/// Fills `buf` (one block) with the version `seq` of block `block`: magic, block number,
/// sequence number and seed, then bytes derived from them, so that a block read after a
/// cut says exactly which write put it there.
pub fn fill(buf: &mut [u8], seed: u64, block: u64, seq: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut x = (seed
        ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ seq.wrapping_mul(0xd1b5_4a32_d192_ed03))
        | 1;
    for chunk in buf[32..].chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The requests the client makes, in order: the same seed, first sequence number, disk
/// size and discard rate give the same requests, so the checker knows the request that
/// was in flight when the power went, which the client could not report, and every
/// request before the last acknowledged one.
#[derive(Debug, Clone)]
pub struct Plan {
    rng: u64,
    seq: u64,
    blocks: u64,
    discard_every: u64,
    last_written: Option<u64>,
}

impl Plan {
    /// Requests from `first_seq` on, on a disk of `blocks` blocks; about one in
    /// `discard_every` is a discard of the block written just before (0: none).
    pub fn new(seed: u64, first_seq: u64, blocks: u64, discard_every: u64) -> Plan {
        Plan {
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            seq: first_seq,
            blocks: blocks.max(1),
            discard_every,
            last_written: None,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

impl Iterator for Plan {
    type Item = Ack;

    fn next(&mut self) -> Option<Ack> {
        let discard = self.discard_every != 0 && self.next_random() % self.discard_every == 0;
        // A discard takes back the block written last, so that a discard lost in a cut
        // shows as that write coming back.
        let block = match (discard, self.last_written) {
            (true, Some(block)) => block,
            _ => self.next_random() % self.blocks,
        };
        let request = Ack {
            seq: self.seq,
            block,
            write: !(discard && self.last_written.is_some()),
        };
        self.last_written = request.write.then_some(block);
        self.seq += 1;
        Some(request)
    }
}

/// What a block of the region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    /// Version `seq` of this block, intact.
    Version(u64),
    /// Anything else: torn, foreign, or another block's data.
    Garbage,
}

/// Reads one block of the region.
pub fn content(data: &[u8], seed: u64, block: u64) -> Content {
    if data.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if data.len() != BLOCK || &data[..8] != MAGIC {
        return Content::Garbage;
    }
    let field = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or_default());
    let seq = field(16);
    if field(8) != block || field(24) != seed {
        return Content::Garbage;
    }
    let mut expected = vec![0u8; BLOCK];
    fill(&mut expected, seed, block, seq);
    if expected == data {
        Content::Version(seq)
    } else {
        Content::Garbage
    }
}

/// One request (acknowledged, or planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    pub block: u64,
    /// True for a write, false for a discard (the block reads zero after it).
    pub write: bool,
}

/// The check word the client appends to each line it prints: the serial console that
/// carries the lines also carries the guest kernel's messages, which can land in the middle
/// of a line and split it into two that still look like lines ("ACK 66 W 38" + "51" once
/// made a write to block 3851 look like one to block 38). A line whose word does not match
/// its text is not the client's.
pub fn line_check(text: &str) -> String {
    // FNV-1a, 32 bits: enough to tell a whole line from a torn one.
    let hash = text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{hash:08x}")
}

/// One line as the client prints it: `text` and its check word.
pub fn checked_line(text: &str) -> String {
    format!("{text} {}", line_check(text))
}

/// What the client printed before the cut.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Log {
    pub acks: Vec<Ack>,
    /// The highest sequence number a completed FLUSH covers (0: none).
    pub flushed: u64,
    /// The client finished its requests.
    pub done: bool,
    /// Lines that began like the client's but whose check word did not match (torn by
    /// other console output, or cut short by the power cut).
    pub torn: usize,
}

impl Log {
    /// Parses the client's lines out of a console log; other lines are ignored, and so are
    /// lines of the client's that arrived torn (counted in `torn`).
    pub fn parse(console: &str) -> Log {
        let mut log = Log::default();
        for line in console.lines().map(|l| l.trim_end_matches('\r')) {
            let Some((text, check)) = line.rsplit_once(' ') else {
                continue;
            };
            let words: Vec<&str> = text.split(' ').collect();
            if !matches!(words.first(), Some(&("ACK" | "FLUSHED" | "CLIENT-DONE"))) {
                continue;
            }
            if check != line_check(text) {
                log.torn += 1;
                continue;
            }
            match words.as_slice() {
                ["ACK", seq, kind @ ("W" | "Z"), block] => {
                    if let (Ok(seq), Ok(block)) = (seq.parse(), block.parse()) {
                        log.acks.push(Ack {
                            seq,
                            block,
                            write: *kind == "W",
                        });
                    }
                }
                ["FLUSHED", seq] => {
                    if let Ok(seq) = seq.parse::<u64>() {
                        log.flushed = log.flushed.max(seq);
                    }
                }
                ["CLIENT-DONE", _] => log.done = true,
                _ => {}
            }
        }
        log
    }

    /// The highest acknowledged sequence number.
    pub fn last_ack(&self) -> u64 {
        self.acks.iter().map(|a| a.seq).max().unwrap_or(0)
    }

    /// Puts the client's plan in place of the acknowledgements read from the console: the
    /// client makes one request at a time, in the plan's order, so every request up to the
    /// last acknowledged one completed, including those whose line the console lost. Fails
    /// if a line read disagrees with the plan (the client and the checker disagree about
    /// what was written, and nothing checked after that would mean anything).
    pub fn complete_from(&mut self, plan: Plan) -> Result<(), String> {
        let last = self.last_ack();
        let planned: Vec<Ack> = plan.take_while(|r| r.seq <= last).collect();
        for ack in &self.acks {
            if !planned.contains(ack) {
                return Err(format!(
                    "the client acknowledged {ack:?}, which is not in its plan"
                ));
            }
        }
        self.acks = planned;
        Ok(())
    }
}

/// Checks `region` (the region file after a cut) against the acknowledgements in `log`:
/// every request acknowledged up to `durable` (its sequence number) must be there, each
/// block holding its last durable version or a later one; blocks never hold garbage.
/// `in_flight` is the request that may have been under way at the cut (the one after the
/// last acknowledgement): like the acknowledged requests after `durable`, it may or may
/// not have taken effect, so a block may be zero after a later discard of it.
/// Returns one line per violated block, empty when all promises were kept.
pub fn check(
    region: &[u8],
    log: &Log,
    seed: u64,
    durable: u64,
    in_flight: Option<Ack>,
) -> Vec<String> {
    let mut last_durable = std::collections::HashMap::<u64, Ack>::new();
    for ack in log.acks.iter().filter(|a| a.seq <= durable) {
        last_durable.insert(ack.block, *ack);
    }
    let later: Vec<Ack> = log
        .acks
        .iter()
        .filter(|a| a.seq > durable)
        .copied()
        .chain(in_flight)
        .collect();
    let discarded_later = |ack: &Ack| {
        later
            .iter()
            .any(|l| !l.write && l.block == ack.block && l.seq > ack.seq)
    };
    let mut findings = Vec::new();
    for (block, data) in region.chunks(BLOCK).enumerate() {
        let block = block as u64;
        let found = content(data, seed, block);
        let promised = last_durable.get(&block);
        let kept = match (promised, found) {
            (_, Content::Garbage) => false,
            (None, _) => true,
            // After a durable discard, or a later one that may have taken effect.
            (Some(ack), Content::Zero) => !ack.write || discarded_later(ack),
            (Some(ack), Content::Version(seq)) => {
                if ack.write {
                    seq >= ack.seq
                } else {
                    seq > ack.seq
                }
            }
        };
        if !kept {
            findings.push(format!(
                "block {block}: {} was durable, the region holds {found:?}",
                match promised {
                    Some(ack) if ack.write => format!("write {}", ack.seq),
                    Some(ack) => format!("discard {}", ack.seq),
                    None => "nothing".to_owned(),
                }
            ));
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console log with the client's `lines` among the kernel's.
    fn console(lines: &[&str]) -> String {
        let mut out = "boot noise\n".to_owned();
        for line in lines {
            out += &checked_line(line);
            out.push('\n');
        }
        out
    }

    fn region_with(versions: &[(u64, Option<u64>)], blocks: u64) -> Vec<u8> {
        let mut region = vec![0u8; blocks as usize * BLOCK];
        for &(block, seq) in versions {
            if let Some(seq) = seq {
                let at = block as usize * BLOCK;
                fill(&mut region[at..at + BLOCK], 7, block, seq);
            }
        }
        region
    }

    #[test]
    fn blocks_say_which_write_made_them() {
        let region = region_with(&[(1, Some(5))], 3);
        assert_eq!(content(&region[..BLOCK], 7, 0), Content::Zero);
        assert_eq!(
            content(&region[BLOCK..2 * BLOCK], 7, 1),
            Content::Version(5)
        );
        // Another block's data, a torn block, another seed.
        assert_eq!(content(&region[BLOCK..2 * BLOCK], 7, 2), Content::Garbage);
        let mut torn = region[BLOCK..2 * BLOCK].to_vec();
        torn[2048..].fill(0);
        assert_eq!(content(&torn, 7, 1), Content::Garbage);
        assert_eq!(content(&region[BLOCK..2 * BLOCK], 8, 1), Content::Garbage);
    }

    #[test]
    fn durable_requests_must_be_there_later_ones_may_be() {
        let log = console(&[
            "ACK 1 W 0",
            "ACK 2 W 1",
            "FLUSHED 2",
            "ACK 3 W 0",
            "ACK 4 Z 1",
            "ACK 5 W 2",
        ]) + "ACK 6 W";
        let log = Log::parse(&log);
        assert_eq!(log.flushed, 2);
        assert_eq!(log.last_ack(), 5);
        // Everything flushed is there, later requests partly.
        let ok = region_with(&[(0, Some(3)), (1, Some(2))], 3);
        assert!(check(&ok, &log, 7, log.flushed, None).is_empty());
        // The flushed write to block 0 is missing (block 1 may be zero: its discard 4 may
        // have taken effect).
        let lost = region_with(&[(2, Some(5))], 3);
        assert_eq!(
            check(&lost, &log, 7, log.flushed, None),
            ["block 0: write 1 was durable, the region holds Zero"]
        );
        // A block older than its durable write.
        let old = region_with(&[(0, Some(3)), (1, Some(1))], 3);
        assert_eq!(check(&old, &log, 7, log.flushed, None).len(), 1);
        // Every acknowledgement durable (write-through): block 1's discard and block 2's
        // write must both be there.
        let all = region_with(&[(0, Some(3)), (2, Some(5))], 3);
        assert!(check(&all, &log, 7, log.last_ack(), None).is_empty());
        assert_eq!(check(&ok, &log, 7, log.last_ack(), None).len(), 2);
    }

    #[test]
    fn a_discard_under_way_at_the_cut_may_have_taken_effect() {
        let log = Log::parse(&console(&[
            "ACK 1 W 0",
            "ACK 2 W 1",
            "FLUSHED 2",
            "ACK 3 W 1",
        ]));
        let discard_of_1 = Ack {
            seq: 4,
            block: 1,
            write: false,
        };
        // Block 1 zero: the flushed write 2 is gone unless a later discard of block 1 may
        // have run (acknowledged after the flush, or in flight).
        let zeroed = region_with(&[(0, Some(1))], 2);
        assert_eq!(check(&zeroed, &log, 7, 2, None).len(), 1);
        assert!(check(&zeroed, &log, 7, 2, Some(discard_of_1)).is_empty());
        let discard_of_0 = Ack {
            block: 0,
            ..discard_of_1
        };
        assert_eq!(check(&zeroed, &log, 7, 2, Some(discard_of_0)).len(), 1);
        // A discard before the durable write does not excuse its loss.
        let log = Log::parse(&console(&["ACK 1 Z 1", "ACK 2 W 1", "FLUSHED 2"]));
        assert_eq!(check(&zeroed, &log, 7, 2, None).len(), 1);
    }

    #[test]
    fn the_plan_discards_the_block_written_last_and_repeats() {
        let plan: Vec<Ack> = Plan::new(42, 100, 64, 3).take(200).collect();
        assert_eq!(plan[0].seq, 100);
        assert!(plan.iter().any(|r| !r.write));
        for pair in plan.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq + 1);
            if !pair[1].write {
                assert!(pair[0].write, "a discard follows a write");
                assert_eq!(pair[1].block, pair[0].block);
            }
        }
        assert!(plan.iter().all(|r| r.block < 64));
        // The same plan again: the checker's copy is the client's.
        assert!(Plan::new(42, 100, 64, 3).take(200).eq(plan.iter().copied()));
    }

    #[test]
    fn a_line_torn_by_kernel_output_is_not_an_acknowledgement() {
        // What failed a CI run: the line for a write to block 3851, split after "38".
        let whole = checked_line("ACK 66 W 3851");
        let (head, tail) = whole.split_at("ACK 66 W 38".len());
        let torn = format!("{head}\n[ 12.3] some kernel message\n{tail}\n");
        let log = Log::parse(&torn);
        assert!(log.acks.is_empty());
        assert_eq!(log.torn, 1);
        // A line without its check word (an old client, or cut short) is not taken either.
        assert_eq!(Log::parse("ACK 66 W 38\n").acks, []);
        assert_eq!(Log::parse(&(whole + "\n")).acks.len(), 1);
    }

    #[test]
    fn the_plan_fills_in_acknowledgements_the_console_lost() {
        let plan = || Plan::new(42, 100, 64, 3);
        let requests: Vec<Ack> = plan().take(10).collect();
        let line = |r: &Ack| {
            checked_line(&format!(
                "ACK {} {} {}",
                r.seq,
                if r.write { 'W' } else { 'Z' },
                r.block
            ))
        };
        // Only the 3rd and the 10th line arrived.
        let mut log = Log::parse(&format!("{}\n{}\n", line(&requests[2]), line(&requests[9])));
        log.complete_from(plan()).unwrap();
        assert_eq!(log.acks, requests);
        // A line that is not the plan's request (another block) is refused.
        let wrong = Ack {
            block: (requests[4].block + 1) % 64,
            ..requests[4]
        };
        let mut log = Log::parse(&(line(&wrong) + "\n"));
        assert!(log.complete_from(plan()).is_err());
    }
}
