//! Fault rules from any text (short form or JSON): never a panic; a rule that parses
//! prints back (short form and JSON) to the same rule; a rule daxd accepts meets any
//! request without a panic, and clearing it leaves nothing behind.
#![no_main]

use libfuzzer_sys::fuzz_target;

use daxd_fault::{Faults, Io, Op, RuleSpec, Verdict};

const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Discard,
    Op::WriteZeroes,
    Op::GetId,
    Op::PmemFlush,
];

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes choose requests; the rest is the rule's text.
    let (choice, text) = data.split_at(data.len().min(8));
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(spec) = RuleSpec::parse(text) else {
        return;
    };
    assert_eq!(RuleSpec::parse(&spec.to_string()).as_ref(), Ok(&spec));
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(RuleSpec::parse(&json).as_ref(), Ok(&spec));
    let faults = Faults::new(vec!["disk".into(), "pm0".into()]);
    if faults.add(spec).is_err() {
        return;
    }
    for (i, &byte) in choice.iter().enumerate() {
        let op = OPS[usize::from(byte) % OPS.len()];
        let start = u64::from(byte) * 37 + i as u64;
        let io = Io {
            op,
            queue: u16::from(byte & 3),
            sectors: [start, start + u64::from(byte % 9)],
        };
        let device = if op == Op::PmemFlush { "pm0" } else { "disk" };
        let _ = faults.check(device, &io);
    }
    faults.mark("m").unwrap();
    assert_eq!(faults.clear(None), Ok(1));
    let io = Io {
        op: Op::Read,
        queue: 0,
        sectors: [0, 1],
    };
    assert_eq!(faults.check("disk", &io), Verdict::Pass);
});
