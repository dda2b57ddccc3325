//! The control socket's client side: `daxd inspect` and `daxd resize`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::prometheus::prometheus;
use daxd_fault::{RuleInfo, RuleSpec};

use super::protocol::{FrontendNotice, Inspection, Request, ResizeRefused, Resized};
use super::tables::tables;
use crate::error::Error;

/// How `daxd inspect` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tables,
    Json,
    Prometheus,
}

/// `daxd inspect`: fetches one inspection and prints it as tables, JSON or Prometheus
/// text.
pub fn inspect(control_socket: &Path, format: Format) -> Result<String, Error> {
    let inspection = fetch(control_socket)?;
    Ok(match format {
        Format::Json => {
            let mut text =
                serde_json::to_string(&inspection).map_err(|source| Error::BadInspection {
                    path: control_socket.to_owned(),
                    source,
                })?;
            text.push('\n');
            text
        }
        Format::Tables => tables(&inspection),
        Format::Prometheus => prometheus(&inspection),
    })
}

/// One inspection from a running daxd.
pub fn fetch(control_socket: &Path) -> Result<Inspection, Error> {
    ask(control_socket, Request::Inspect)
}

/// `daxd resize`: asks a running daxd to grow its disk to `bytes`; prints what it did.
pub fn resize(control_socket: &Path, bytes: u64) -> Result<String, Error> {
    let resized: Result<Resized, ResizeRefused> = ask(control_socket, Request::Resize { bytes })?;
    let resized = resized.map_err(Error::Resize)?;
    let mut text = format!(
        "disk window {}: {} bytes (was {})\n",
        resized.window, resized.size, resized.before
    );
    text.push_str(match &resized.frontend {
        FrontendNotice::Unchanged => "unchanged; the frontend was not told\n",
        FrontendNotice::Told => {
            "the frontend acknowledged the change; the guest sees the new capacity\n"
        }
        FrontendNotice::NoChannel => {
            "no frontend with a backend channel is connected; the next one reads the new size\n"
        }
        FrontendNotice::NoAnswer => "the frontend has not acknowledged the change yet\n",
        FrontendNotice::Failed(_) => {
            "telling the frontend failed; it reads the new size when it next asks\n"
        }
    });
    if let FrontendNotice::Failed(e) = &resized.frontend {
        let _ = writeln!(text, "({e})");
    }
    Ok(text)
}

/// `daxd fault add`: adds a rule to a running daxd; prints its number.
pub fn fault_add(control_socket: &Path, rule: RuleSpec) -> Result<String, Error> {
    let text = rule.to_string();
    let added: Result<u64, String> = ask(control_socket, Request::FaultAdd { rule })?;
    let id = added.map_err(Error::Fault)?;
    Ok(format!("rule {id}: {text}\n"))
}

/// `daxd fault list`: the rules of a running daxd and their hits, as a table or JSON.
pub fn fault_list(control_socket: &Path, json: bool) -> Result<String, Error> {
    let rules: Vec<RuleInfo> = ask(control_socket, Request::FaultList)?;
    if json {
        let mut text = serde_json::to_string(&rules).expect("rules encode");
        text.push('\n');
        return Ok(text);
    }
    Ok(super::tables::fault_table(&rules))
}

/// `daxd fault clear`: removes rule `id`, or every rule; held requests complete.
pub fn fault_clear(control_socket: &Path, id: Option<u64>) -> Result<String, Error> {
    let cleared: Result<usize, String> = ask(control_socket, Request::FaultClear { id })?;
    let n = cleared.map_err(Error::Fault)?;
    Ok(format!("{n} rule(s) cleared\n"))
}

/// `daxd mark`: sets a named mark in a running daxd.
pub fn mark(control_socket: &Path, name: &str) -> Result<String, Error> {
    let marked: Result<(), String> = ask(
        control_socket,
        Request::Mark {
            name: name.to_owned(),
        },
    )?;
    marked.map_err(Error::Fault)?;
    Ok(format!("mark {name} set\n"))
}

/// Sends `request` and reads the answer.
fn ask<T: serde::de::DeserializeOwned>(
    control_socket: &Path,
    request: Request,
) -> Result<T, Error> {
    let unreachable = |source| Error::Inspect {
        path: control_socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(control_socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    let mut line = serde_json::to_string(&request).expect("a request encodes");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(unreachable)?;
    serde_json::from_str(&text).map_err(|source| Error::BadInspection {
        path: control_socket.to_owned(),
        source,
    })
}
