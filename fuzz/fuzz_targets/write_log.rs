//! Reading a damaged or truncated write log (`daxd crash-states`), and making the crash
//! states of whatever it accepts over a small disk: refused with a message, never a
//! panic, never a state written outside the disk.
#![no_main]

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use daxd_record::states::{for_each_state, Options};
use daxd_record::LogReader;

const DISK: u64 = 64 << 10;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::File::create(dir.path().join("base")).unwrap();
        base.set_len(DISK).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let path = dir.path().join("log");
    std::fs::File::create(&path).unwrap().write_all(data).unwrap();
    let Ok(log) = LogReader::open(&path) else {
        return;
    };
    for entry in log.entries() {
        if let Err(e) = entry {
            let _ = e.to_string();
            break;
        }
    }
    let options = Options {
        samples: 2,
        seed: 1,
        max_states: 20,
        only: None,
    };
    let _ = for_each_state(&log, &dir.path().join("base"), &dir.path().join("work"), &options, |_, image| {
        assert_eq!(std::fs::metadata(image).unwrap().len(), DISK);
        ControlFlow::Continue(())
    });
});
