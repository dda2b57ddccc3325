//! A QMP client for the tests that drive QEMU at run time (live migration).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket (waiting up to 30 s
    /// for QEMU to create it) and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => {
                    panic!("QMP socket {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = qmp.next_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn next_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading QMP: {e}"));
        assert!(n > 0, "QEMU closed its QMP socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs `command` and returns its `return` value; an `error` answer is `Err` with
    /// QEMU's description. Events that arrive meanwhile are skipped.
    pub fn try_execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").map_err(|e| format!("QEMU's QMP socket: {e}"))?;
        loop {
            let message = self.next_message();
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(error["desc"].as_str().unwrap_or("?").to_owned());
            }
        }
    }

    /// [`Qmp::try_execute`], panicking on an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        self.try_execute(command, arguments)
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }
}
