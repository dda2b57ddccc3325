//! daxd's command line: the size and `--window` parsers on any text, and the whole
//! parser on any argument list (arguments separated by NUL bytes). Never a panic; a size or
//! window that parses parses again to the same value from its canonical form.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

use daxd_region::Serve;

// The binary's own parsers, compiled into the target (the daxd crate has no library).
#[path = "../../crates/daxd/src/args.rs"]
mod args;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(size) = args::parse_size(text) {
        assert_eq!(args::parse_size(&size.to_string()), Ok(size));
    }
    if let Ok(window) = args::parse_window(text) {
        let serve = match window.serve {
            Serve::Blk => "blk",
            Serve::Pmem => "pmem",
            Serve::Both => "both",
        };
        let canonical = format!(
            "name={},offset={},size={},serve={serve}",
            window.name, window.offset, window.size
        );
        assert_eq!(args::parse_window(&canonical), Ok(window));
    }
    // Help and errors print and do not exit with try_parse_from.
    let words = std::iter::once("daxd").chain(text.split('\0'));
    if let Ok(cli) = args::Cli::try_parse_from(words) {
        let _ = (cli.command, cli.serve.print_capabilities, args::CAPABILITIES);
    }
});
