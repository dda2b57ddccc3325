//! `daxd crash-states`: each crash state of a recording, made and checked in turn.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use daxd_record::states::{for_each_state, Kind, Options, State};
use daxd_record::LogReader;

use crate::args::CrashStatesArgs;
use crate::error::Error;

pub fn run(args: &CrashStatesArgs) -> Result<(), Error> {
    let dir = &args.record;
    let states_error = |source| Error::CrashStates {
        dir: dir.clone(),
        source,
    };
    let (base, log) = daxd_record::files(&args.device);
    let log = LogReader::open(&dir.join(log)).map_err(|e| states_error(e.into()))?;
    let base = dir.join(base);
    let work = args.work.clone().unwrap_or_else(|| dir.join("states"));
    let options = Options {
        samples: args.samples,
        seed: args.seed,
        max_states: args.max_states,
        only: args.state,
    };

    if let (Some(number), Some(out)) = (args.state, &args.out) {
        let mut copied = Ok(false);
        for_each_state(&log, &base, &work, &options, |state, image| {
            copied = std::fs::copy(image, out).map(|_| {
                println!(
                    "state {}: {} -> {}",
                    state.number,
                    describe(state),
                    out.display()
                );
                true
            });
            ControlFlow::Break(())
        })
        .map_err(states_error)?;
        return match copied {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::CrashStates {
                dir: dir.clone(),
                source: daxd_record::states::StatesError::NoSuchState(number),
            }),
            Err(source) => Err(Error::io("copy the state's image")(source)),
        };
    }

    let check = args.check.clone().unwrap_or_default();
    let started = Instant::now();
    let mut failed = 0u64;
    let mut first = None;
    let mut spawn_error = None;
    let made = for_each_state(&log, &base, &work, &options, |state, image| {
        match checked(&check, state, image) {
            Ok((true, _)) => {
                println!("state {} ({}): ok", state.number, describe(state));
                ControlFlow::Continue(())
            }
            Ok((false, output)) => {
                println!("state {} ({}): FAILED", state.number, describe(state));
                print!("{output}");
                failed += 1;
                first.get_or_insert(state.number);
                if args.keep_going {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            }
            Err(e) => {
                spawn_error = Some(e);
                ControlFlow::Break(())
            }
        }
    })
    .map_err(states_error)?;
    if let Some(source) = spawn_error {
        return Err(Error::Checker { check, source });
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{made} state(s) checked in {seconds:.1} s ({:.0} a minute), {failed} failed; log of {} entries, seed {}",
        made as f64 * 60.0 / seconds.max(1e-3),
        log.announced(),
        args.seed
    );
    match first {
        None => Ok(()),
        Some(first) => Err(Error::StatesFailed {
            failed,
            first,
            again: format!(
                "daxd crash-states --record {} --device {} --samples {} --seed {} --state {first} --out state-{first}.img",
                dir.display(),
                args.device,
                args.samples,
                args.seed
            ),
        }),
    }
}

/// Runs the checker on `image`: whether it passed, and what it printed.
fn checked(check: &str, state: &State, image: &Path) -> std::io::Result<(bool, String)> {
    let quoted = format!("'{}'", image.display().to_string().replace('\'', r"'\''"));
    let output = Command::new("sh")
        .arg("-c")
        .arg(check.replace("{}", &quoted))
        .env("DAXD_STATE", state.number.to_string())
        .env("DAXD_STATE_KIND", kind_name(&state.kind))
        .env("DAXD_MARKS", state.marks.join("\n"))
        .output()?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Start => "start".into(),
        Kind::Flush { n } => format!("flush:{n}"),
        Kind::Sample { after, sample } => format!("sample:{after}:{sample}"),
    }
}

/// A state as a person reads it.
fn describe(state: &State) -> String {
    let what = match &state.kind {
        Kind::Start => "the disk as recording began".to_owned(),
        Kind::Flush { n } => format!("FLUSH point {n}, log entries before {}", state.entries),
        Kind::Sample { after, sample } => format!(
            "sample {sample} after FLUSH point {after}: {} of {} blocks written since hold a new version",
            state.blocks.1, state.blocks.0
        ),
    };
    match state.marks.last() {
        Some(mark) => format!("{what}; marks up to {mark}"),
        None => what,
    }
}
