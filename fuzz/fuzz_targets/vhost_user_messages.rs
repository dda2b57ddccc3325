//! Any bytes a frontend can send on the disk's vhost-user socket (messages without file
//! descriptors): daxd's server, running in this process, must neither crash nor hang, and
//! must still accept the next connection. Each input is one connection; its bytes are
//! written whole, then the connection is closed.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

use daxd_vhost_user::{Server, SocketAddr};

#[path = "blk.rs"]
mod blk;
// Only the world (region, registry) is used here, not the chain builder.
#[allow(dead_code)]
#[path = "common.rs"]
mod common;

fn socket() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let w = common::world();
        let layout = Arc::new(blk::layout());
        let device = Arc::new(blk::device(&layout, 2));
        let path = w._dir.path().join("blk.sock");
        let server = Server::listen(&SocketAddr::Path(path.clone()), "blk").unwrap();
        std::thread::spawn(move || {
            server
                .serve_blk(
                    device,
                    Arc::new(arc_swap::ArcSwap::new(layout)),
                    Default::default(),
                    Duration::ZERO,
                )
                .expect("the server stopped");
        });
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let path = socket();
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The server may close the connection at any message: a failed write ends the input.
    let _ = stream.write_all(data);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Drain replies until the server closes its side; a server that never does would hang
    // the next connection, which libFuzzer's timeout reports.
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
});
