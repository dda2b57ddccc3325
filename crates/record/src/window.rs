//! Recording a persistent-memory window. daxd sees none of the guest's DAX stores, but
//! it serves the window's virtio-pmem FLUSH (QEMU 11.1's shared-memory path): at each one
//! it compares the window with what it held at the previous one (a shadow copy in the
//! recording's directory) and logs every page that changed as a 4 KiB write, then a FLUSH.
//! The log has the disk's format, so the same crash states follow from it: every FLUSH
//! point, and samples in which each page changed since the previous point holds its new
//! content or its old one. (Page-granular, and with the content a page had at the FLUSH:
//! the host may also have written a page back between two of the guest's stores to it,
//! which no sample shows.)

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::format::SECTOR;
use crate::{DiskLog, BLOCK};

/// Bytes compared at a time.
const CHUNK: usize = 256 << 10;

/// A pmem window being recorded.
#[derive(Debug)]
pub struct WindowRecorder {
    log: Arc<DiskLog>,
    /// The window as it was at the last FLUSH point.
    shadow: File,
    len: u64,
    /// The window's chunk and the shadow's, made at the start so that a FLUSH on the
    /// queue worker allocates nothing.
    bufs: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl WindowRecorder {
    /// Starts recording a window of `len` bytes whose content now is the file `base`:
    /// the shadow starts as a copy of it, and the log at `log` empty. With `all_flushes`
    /// false, [`WindowRecorder::flushed`] is not called at every FLUSH of the window (QEMU
    /// serves them), so the log says that states between its FLUSH points are not to be
    /// sampled: FLUSHes it does not show ordered the writes between them.
    pub fn create(
        base: &Path,
        shadow: &Path,
        log: &Path,
        len: u64,
        all_flushes: bool,
    ) -> io::Result<WindowRecorder> {
        crate::states::copy_image(base, shadow)?;
        let log = DiskLog::create(log)?;
        if !all_flushes {
            log.mark(crate::NO_SAMPLES);
        }
        Ok(WindowRecorder {
            log: Arc::new(log),
            shadow: File::options().read(true).write(true).open(shadow)?,
            len,
            bufs: Mutex::new((vec![0; CHUNK], vec![0; CHUNK])),
        })
    }

    /// The window's log (for marks).
    pub fn log(&self) -> &Arc<DiskLog> {
        &self.log
    }

    /// A FLUSH of the window completed: logs each page that changed since the last one,
    /// read with `read(offset, buf)` (window offsets), then a FLUSH point.
    pub fn flushed(&self, read: impl Fn(u64, &mut [u8]) -> io::Result<()>) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let (now, was) = &mut *bufs;
        let mut at = 0u64;
        while at < self.len {
            let n = (self.len - at).min(CHUNK as u64) as usize;
            let compared =
                read(at, &mut now[..n]).and_then(|()| self.shadow.read_exact_at(&mut was[..n], at));
            if let Err(e) = compared {
                log::error!(
                    "recording the pmem window stopped: cannot compare it with its last state: {e}"
                );
                return;
            }
            for page in 0..n.div_ceil(BLOCK as usize) {
                let range = page * BLOCK as usize..((page + 1) * BLOCK as usize).min(n);
                if now[range.clone()] == was[range.clone()] {
                    continue;
                }
                let offset = at + range.start as u64;
                let content = &now[range.clone()];
                self.log
                    .write(offset / SECTOR, content.len() as u64, |file, pos| {
                        file.write_all_at(content, pos)
                    });
                if let Err(e) = self.shadow.write_all_at(content, offset) {
                    log::error!(
                        "recording the pmem window stopped: cannot keep its last state: {e}"
                    );
                    return;
                }
            }
            at += n as u64;
        }
        self.log.flush_point();
    }
}
