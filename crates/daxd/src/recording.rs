//! `--record`: what daxd records for `daxd crash-states`, and the marks that go into it.

use std::path::Path;
use std::sync::Arc;

use log::info;

use daxd_record::{DiskLog, WindowRecorder};
use daxd_region::{Region, Window};

use crate::error::Error;

/// The logs being recorded.
#[derive(Debug, Default)]
pub struct Recording {
    disk: Option<Arc<DiskLog>>,
    /// Windows whose virtio-pmem FLUSH daxd serves: recorded at each FLUSH.
    served: Vec<Arc<WindowRecorder>>,
    /// Windows QEMU maps from the region file and flushes itself (QEMU 10's
    /// memory-backend-file): recorded at each mark, with the window's offset.
    mapped: Vec<(Arc<WindowRecorder>, u64)>,
}

impl Recording {
    /// Starts recording the disk into `dir`: its content now, then everything it stores.
    pub fn record_disk(
        &mut self,
        dir: &Path,
        region: &Region,
        disk: &Window,
    ) -> Result<Arc<DiskLog>, Error> {
        let failed = |source| Error::Record {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(failed)?;
        let base = dir.join(daxd_record::BASE);
        daxd_record::states::copy_range(region.path(), disk.offset, disk.size, &base)
            .map_err(failed)?;
        let log = Arc::new(DiskLog::create(&dir.join(daxd_record::LOG)).map_err(failed)?);
        info!(
            "recording the disk's crash states in {}: the disk as it is now in {}, what it stores from now on in {}",
            dir.display(),
            daxd_record::BASE,
            daxd_record::LOG
        );
        self.disk = Some(log.clone());
        Ok(log)
    }

    /// Starts recording pmem window `window` into `dir`: at each virtio-pmem FLUSH daxd
    /// serves for it (`served`), or else at each mark.
    pub fn record_window(
        &mut self,
        dir: &Path,
        region: &Region,
        window: &Window,
        served: bool,
    ) -> Result<Arc<WindowRecorder>, Error> {
        let failed = |source| Error::Record {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(failed)?;
        let (base, log) = daxd_record::files(&window.name);
        let base = dir.join(base);
        daxd_record::states::copy_range(region.path(), window.offset, window.size, &base)
            .map_err(failed)?;
        let shadow = dir.join(format!("pmem-{}.shadow", window.name));
        let recorder = Arc::new(
            WindowRecorder::create(&base, &shadow, &dir.join(&log), window.size, served)
                .map_err(failed)?,
        );
        info!(
            "recording pmem window {}'s state at each {} in {}",
            window.name,
            if served {
                "virtio-pmem FLUSH"
            } else {
                "mark (QEMU serves its FLUSH; set a mark after the guest's fsync returned)"
            },
            dir.join(log).display()
        );
        if served {
            self.served.push(recorder.clone());
        } else {
            self.mapped.push((recorder.clone(), window.offset));
        }
        Ok(recorder)
    }

    /// Sets mark `name` in every log. A window QEMU flushes itself gets a FLUSH point
    /// first, with its content now: set after the guest saw an fsync return, the mark
    /// says that everything before is durable (QEMU made it so), and what the window
    /// holds now is a state a power cut may leave.
    pub fn mark(&self, name: &str, region: &Region) {
        for (recorder, offset) in &self.mapped {
            recorder.flushed(|at, buf| {
                region
                    .read_bytes(offset + at, buf)
                    .map_err(std::io::Error::other)
            });
        }
        for log in self.logs() {
            log.mark(name);
        }
    }

    fn logs(&self) -> impl Iterator<Item = &Arc<DiskLog>> {
        self.disk
            .iter()
            .chain(self.served.iter().map(|w| w.log()))
            .chain(self.mapped.iter().map(|(w, _)| w.log()))
    }

    /// Completes every log's super block; call when nothing appends any more.
    pub fn finish(&self) {
        for log in self.logs() {
            log.finish();
        }
    }
}
