use super::*;

fn rule(text: &str) -> RuleSpec {
    RuleSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn refused(text: &str) -> String {
    match RuleSpec::parse(text) {
        Ok(spec) => panic!("{text} was accepted as {spec:?}"),
        Err(e) => e.to_string(),
    }
}

fn io(op: Op, sectors: [u64; 2]) -> Io {
    Io {
        op,
        queue: 0,
        sectors,
    }
}

fn faults() -> Faults {
    Faults::new(vec!["disk".into(), "pm0".into()])
}

#[test]
fn every_field_of_the_short_form() {
    let spec = rule(
        "device=disk,op=write-zeroes,sectors=8..16,queue=1,when=nth:3,after=boot,action=fail:unsupp",
    );
    assert_eq!(
        spec,
        RuleSpec {
            device: "disk".into(),
            op: OpMatch::WriteZeroes,
            sectors: Some([8, 16]),
            queue: Some(1),
            when: When::Nth(3),
            after: Some("boot".into()),
            action: Action::Fail(Status::Unsupp),
        }
    );
    assert_eq!(rule("action=fail").action, Action::Fail(Status::Ioerr));
    assert_eq!(
        rule("action=fail:ioerr").action,
        Action::Fail(Status::Ioerr)
    );
    assert_eq!(rule("action=delay:20ms").action, Action::DelayMs(20));
    assert_eq!(rule("action=delay:2s").action, Action::DelayMs(2000));
    assert_eq!(rule("action=delay:3000us").action, Action::DelayMs(3));
    assert_eq!(rule("action=hold").action, Action::Hold);
    assert_eq!(rule("op=write,action=drop").action, Action::Drop);
    assert_eq!(
        rule("action=corrupt").action,
        Action::Corrupt {
            offset: 0,
            mask: 0xff
        }
    );
    assert_eq!(
        rule("op=read,action=corrupt:0x200:0x01").action,
        Action::Corrupt {
            offset: 512,
            mask: 1
        }
    );
    assert_eq!(
        rule("sectors=0..8,action=bad-blocks").action,
        Action::BadBlocks
    );
    assert_eq!(rule("sectors=7,action=fail").sectors, Some([7, 8]));
    assert_eq!(rule("op=get_id,action=fail").op, OpMatch::GetId);
    assert_eq!(rule("when=once,action=fail").when, When::Once);
    assert_eq!(rule("when=every:4,action=fail").when, When::Every(4));
    assert_eq!(rule("when=times:2,action=fail").when, When::Times(2));
    assert_eq!(
        rule("when=probability:0.25,seed=9,action=fail").when,
        When::Probability { p: 0.25, seed: 9 }
    );
    assert_eq!(
        rule("device=pm0,op=pmem-flush,action=fail").device,
        "pm0".to_owned()
    );
    // Spaces around fields are fine.
    assert_eq!(rule(" op = read , action = fail ").op, OpMatch::Read);
}

#[test]
fn the_short_form_prints_back_to_the_same_rule_and_json_says_the_same() {
    for text in [
        "action=fail",
        "op=read,sectors=2048..4096,action=fail",
        "op=write,queue=1,when=every:16,action=drop",
        "when=probability:0.1,seed=42,action=delay:20ms",
        "op=read,action=corrupt:5:0x80",
        "sectors=100..200,after=m1,action=bad-blocks",
        "device=pm0,op=pmem-flush,when=once,action=fail:unsupp",
        "op=flush,action=hold",
    ] {
        let spec = rule(text);
        assert_eq!(spec.to_string(), text);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(rule(&json), spec, "{json}");
    }
    assert_eq!(
        rule(r#"{"op":"read","sectors":[0,8],"when":{"nth":2},"action":{"fail":"ioerr"}}"#),
        rule("op=read,sectors=0..8,when=nth:2,action=fail")
    );
    assert_eq!(
        rule(r#"{"action":{"delay_ms":5}}"#),
        rule("action=delay:5ms")
    );
}

#[test]
fn every_refusal_says_what_is_wrong() {
    for (text, says) in [
        ("", "no action"),
        ("op=read", "no action"),
        ("action", "is not key=value"),
        ("colour=red,action=fail", "unknown key `colour`"),
        ("op=read,op=write,action=fail", "given twice"),
        ("op=scribble,action=fail", "op: `scribble` is not any, read"),
        ("sectors=9..9,action=fail", "the range is empty"),
        ("sectors=a..9,action=fail", "START..END"),
        ("queue=-1,action=fail", "a queue number"),
        ("when=nth:0,action=fail", "nth must be at least 1"),
        ("when=every:0,action=fail", "every must be at least 1"),
        ("when=times:0,action=fail", "times must be at least 1"),
        ("when=sometimes,action=fail", "when: `sometimes`"),
        ("when=probability:1.5,action=fail", "not between 0 and 1"),
        ("seed=3,action=fail", "seed is only for when=probability"),
        ("action=explode", "action: `explode`"),
        ("action=fail:maybe", "action: `fail:maybe`"),
        ("action=delay:20", "delay:TIME"),
        ("action=delay:1500us", "whole milliseconds"),
        ("action=delay:3600s", "longer than"),
        ("action=corrupt:0:0", "MASK 1 to 255"),
        ("action=corrupt:0:256", "MASK 1 to 255"),
        ("op=read,action=drop", "action drop does not apply to read"),
        (
            "op=flush,action=corrupt",
            "action corrupt does not apply to flush",
        ),
        ("action=bad-blocks", "bad-blocks needs sectors"),
        (
            "sectors=0..20000000,action=bad-blocks",
            "bad-blocks needs sectors",
        ),
        ("op=write,sectors=0..8,action=bad-blocks", "leave op out"),
        ("op=pmem-flush,action=fail", "give device=WINDOW"),
        ("device=pm0,op=read,action=fail", "match op=pmem-flush only"),
        (
            "device=pm0,sectors=0..8,action=fail",
            "without sectors or queue",
        ),
        ("device=pm0,action=delay:5ms", "can fail or be dropped"),
        ("device=a/b,action=fail", "not disk or a window name"),
        ("after=,action=fail", "mark name"),
        ("{\"action\":\"explode\"}", "not a rule in JSON"),
        ("{\"action\":\"hold\",\"colour\":1}", "unknown field"),
    ] {
        let message = refused(text);
        assert!(message.contains(says), "{text}: {message}");
    }
}

#[test]
fn no_rule_passes_everything_and_rules_match_device_op_sectors_and_queue() {
    let faults = faults();
    assert_eq!(faults.check("disk", &io(Op::Read, [0, 8])), Verdict::Pass);
    faults
        .add(rule("op=read,sectors=100..200,queue=1,action=fail"))
        .unwrap();
    let on = |queue, op, sectors| faults.check("disk", &Io { op, queue, sectors });
    let fail = Verdict::Fail(Status::Ioerr);
    assert_eq!(on(1, Op::Read, [96, 104]), fail, "overlaps the start");
    assert_eq!(on(1, Op::Read, [199, 300]), fail, "overlaps the end");
    assert_eq!(
        on(1, Op::Read, [0, 100]),
        Verdict::Pass,
        "ends where it starts"
    );
    assert_eq!(
        on(1, Op::Read, [200, 208]),
        Verdict::Pass,
        "starts at its end"
    );
    assert_eq!(on(0, Op::Read, [150, 151]), Verdict::Pass, "another queue");
    assert_eq!(on(1, Op::Write, [150, 151]), Verdict::Pass, "another op");
    assert_eq!(
        on(1, Op::Flush, [0, 0]),
        Verdict::Pass,
        "a ranged rule never meets a FLUSH"
    );
    assert_eq!(
        faults.check("pm0", &io(Op::PmemFlush, [0, 0])),
        Verdict::Pass,
        "another device"
    );
    assert_eq!(faults.list()[0].hits, 2);
}

#[test]
fn when_counts_matches() {
    let fired = |when: &str, n: usize| -> Vec<bool> {
        let faults = faults();
        faults
            .add(rule(&format!("when={when},action=drop")))
            .unwrap();
        (0..n)
            .map(|_| faults.check("disk", &io(Op::Write, [0, 1])) == Verdict::Drop)
            .collect()
    };
    assert_eq!(fired("always", 3), [true, true, true]);
    assert_eq!(fired("once", 3), [true, false, false]);
    assert_eq!(fired("nth:2", 4), [false, true, false, false]);
    assert_eq!(fired("every:2", 5), [false, true, false, true, false]);
    assert_eq!(fired("times:2", 4), [true, true, false, false]);
    let p = fired("probability:0.3,seed=7", 2000);
    let acted = p.iter().filter(|&&b| b).count();
    assert!((500..700).contains(&acted), "{acted} of 2000 at p=0.3");
    assert_eq!(p, fired("probability:0.3,seed=7", 2000), "reproducible");
    assert_ne!(p, fired("probability:0.3,seed=8", 2000), "the seed matters");
    assert!(fired("probability:0,seed=1", 100).iter().all(|&b| !b));
    assert!(fired("probability:1,seed=1", 100).iter().all(|&b| b));
}

#[test]
fn a_rule_after_a_mark_waits_for_it() {
    let faults = faults();
    faults.add(rule("after=go,action=fail")).unwrap();
    assert_eq!(faults.check("disk", &io(Op::Read, [0, 1])), Verdict::Pass);
    assert!(!faults.list()[0].armed);
    faults.mark("go").unwrap();
    assert_eq!(
        faults.check("disk", &io(Op::Read, [0, 1])),
        Verdict::Fail(Status::Ioerr)
    );
    // A rule added after its mark acts at once; matches before the mark are not counted.
    faults
        .add(rule("after=go,when=once,op=write,action=drop"))
        .unwrap();
    assert_eq!(
        faults.check("disk", &io(Op::Write, [0, 1])),
        Verdict::Fail(Status::Ioerr)
    );
    assert_eq!(faults.list()[1].matched, 0, "the first rule decided");
    assert!(faults.mark("no/slash").is_err());
}

#[test]
fn bad_blocks_fail_reads_until_written() {
    let faults = faults();
    faults
        .add(rule("sectors=100..110,action=bad-blocks"))
        .unwrap();
    let read = |sectors| faults.check("disk", &io(Op::Read, sectors));
    let fail = Verdict::Fail(Status::Ioerr);
    assert_eq!(read([96, 101]), fail);
    assert_eq!(read([0, 100]), Verdict::Pass);
    assert_eq!(faults.list()[0].bad_sectors, Some(10));
    // Writing sectors 100..105 makes them good; 105..110 stay bad.
    assert_eq!(
        faults.check("disk", &io(Op::Write, [98, 105])),
        Verdict::Pass
    );
    assert_eq!(read([100, 105]), Verdict::Pass);
    assert_eq!(read([104, 106]), fail);
    faults.check("disk", &io(Op::Discard, [105, 110]));
    assert_eq!(read([100, 110]), Verdict::Pass);
    assert_eq!(faults.list()[0].bad_sectors, Some(0));
    assert_eq!(faults.list()[0].hits, 2);
}

#[test]
fn a_write_heals_bad_blocks_even_when_an_earlier_rule_decides() {
    let faults = faults();
    faults.add(rule("op=write,action=drop")).unwrap();
    faults.add(rule("sectors=0..8,action=bad-blocks")).unwrap();
    assert_eq!(faults.check("disk", &io(Op::Write, [0, 8])), Verdict::Drop);
    assert_eq!(faults.list()[1].bad_sectors, Some(0));
}

#[test]
fn corrupt_acts_on_requests_that_cover_its_byte() {
    let faults = faults();
    faults
        .add(rule("sectors=10..20,action=corrupt:513:0x0f"))
        .unwrap();
    assert_eq!(
        faults.check("disk", &io(Op::Read, [11, 12])),
        Verdict::Corrupt {
            at: 10 * 512 + 513,
            mask: 0x0f
        }
    );
    assert_eq!(faults.check("disk", &io(Op::Read, [12, 20])), Verdict::Pass);
    assert_eq!(faults.check("disk", &io(Op::Read, [10, 11])), Verdict::Pass);
}

#[test]
fn first_rule_decides_and_clearing_releases_holds() {
    let faults = faults();
    let first = faults.add(rule("op=flush,action=hold")).unwrap();
    faults.add(rule("action=fail")).unwrap();
    let Verdict::Later(release) = faults.check("disk", &io(Op::Flush, [0, 0])) else {
        panic!("not held");
    };
    assert!(!faults.due(&release, Instant::now()));
    assert_eq!(
        faults.check("disk", &io(Op::Read, [0, 1])),
        Verdict::Fail(Status::Ioerr)
    );
    assert_eq!(faults.clear(Some(first)), Ok(1));
    assert!(
        faults.due(&release, Instant::now()),
        "cleared rules release what they hold"
    );
    assert_eq!(faults.clear(Some(first)), Err(FaultError::NoRule(first)));
    assert_eq!(faults.clear(None), Ok(1));
    assert_eq!(faults.check("disk", &io(Op::Read, [0, 1])), Verdict::Pass);
    assert!(faults.list().is_empty());
}

#[test]
fn a_delay_is_due_after_its_time() {
    let faults = faults();
    faults.add(rule("action=delay:50ms")).unwrap();
    let Verdict::Later(release) = faults.check("disk", &io(Op::Read, [0, 1])) else {
        panic!("not delayed");
    };
    let at = release.at().unwrap();
    assert!(at >= Instant::now() + Duration::from_millis(40));
    assert!(!faults.due(&release, Instant::now()));
    assert!(faults.due(&release, at));
}

#[test]
fn rules_name_devices_daxd_serves() {
    let faults = faults();
    let err = faults
        .add(rule("device=pm7,action=fail"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pm7") && err.contains("disk, pm0"), "{err}");
    faults.add(rule("device=pm0,action=drop")).unwrap();
    assert_eq!(
        faults.check("pm0", &io(Op::PmemFlush, [0, 0])),
        Verdict::Drop
    );
}
