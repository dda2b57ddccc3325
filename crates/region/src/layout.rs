//! Carving a region into named windows ("namespaces", as in an NVDIMM region), each served
//! as a virtio-blk disk, as persistent memory, or both.
//!
//! Option string, one `--window` each:
//!
//! ```text
//! name=NAME,offset=SIZE,size=SIZE,serve=blk|pmem|both
//! ```
//!
//! - `name`: unique, `[A-Za-z0-9_-]+`; also the QEMU object id `daxd print-qemu-args` uses.
//! - `offset`, `size`: bytes with an optional K/M/G/T suffix. Page aligned; pmem windows
//!   must be 2 MiB aligned and sized (huge-page mappings, and QEMU's memory-device rules).
//! - `serve`: `blk` (the disk on --socket-path), `pmem` (mapped by the guest), or `both`
//!   (the same bytes as disk and as pmem: the registry then guards the disk's discards).
//!
//! Two windows may not share bytes unless `--allow-overlap` says so: a disk and a pmem
//! mapping of the same bytes means a guest can discard what it has mapped, which daxd then
//! refuses request by request.

use serde::Serialize;

use crate::{parse_size, RegionError, PAGE_SIZE};

/// Pmem windows are aligned and sized to this.
pub const PMEM_ALIGN: u64 = 2 << 20;

/// How a window is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Serve {
    pub blk: bool,
    pub pmem: bool,
}

/// A named byte range of the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub serve: Serve,
}

impl Window {
    /// Parses `name=...,offset=...,size=...,serve=...` (see the module documentation).
    pub fn parse(text: &str) -> Result<Window, RegionError> {
        let bad = |why: String| RegionError::BadWindow(format!("{text:?}: {why}"));
        let (mut name, mut offset, mut size, mut serve) = (None, None, None, None);
        for part in text.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match key {
                "name" => {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(bad("name must be letters, digits, - or _".into()));
                    }
                    name = Some(value.to_owned());
                }
                "offset" => offset = Some(parse_size(value)?),
                "size" => size = Some(parse_size(value)?),
                "serve" => {
                    serve = Some(match value {
                        "blk" => Serve {
                            blk: true,
                            pmem: false,
                        },
                        "pmem" => Serve {
                            blk: false,
                            pmem: true,
                        },
                        "both" => Serve {
                            blk: true,
                            pmem: true,
                        },
                        other => return Err(bad(format!("serve={other}: use blk, pmem or both"))),
                    })
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(Window {
            name: name.ok_or_else(|| bad("name= is missing".into()))?,
            offset: offset.unwrap_or(0),
            size: size.ok_or_else(|| bad("size= is missing".into()))?,
            serve: serve.ok_or_else(|| bad("serve= is missing".into()))?,
        })
    }

    pub fn end(&self) -> u64 {
        self.offset + self.size
    }

    fn overlaps(&self, other: &Window) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// The checked windows of one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub windows: Vec<Window>,
    pub allow_overlap: bool,
}

impl Layout {
    /// Checks `windows` against a region of `region_size` bytes. No windows means one
    /// window `disk` covering the whole region, served as blk.
    pub fn new(
        region_size: u64,
        windows: Vec<Window>,
        allow_overlap: bool,
    ) -> Result<Layout, RegionError> {
        let windows = if windows.is_empty() {
            vec![Window {
                name: "disk".into(),
                offset: 0,
                size: region_size,
                serve: Serve {
                    blk: true,
                    pmem: false,
                },
            }]
        } else {
            windows
        };
        let bad =
            |w: &Window, why: String| RegionError::BadWindow(format!("window {}: {why}", w.name));
        for (i, w) in windows.iter().enumerate() {
            if w.size == 0 || w.offset % PAGE_SIZE != 0 || w.size % PAGE_SIZE != 0 {
                return Err(bad(
                    w,
                    "offset and size must be multiples of 4 KiB, size not 0".into(),
                ));
            }
            if w.serve.pmem && (w.offset % PMEM_ALIGN != 0 || w.size % PMEM_ALIGN != 0) {
                return Err(bad(
                    w,
                    "a pmem window's offset and size must be multiples of 2 MiB".into(),
                ));
            }
            if w.offset
                .checked_add(w.size)
                .is_none_or(|end| end > region_size)
            {
                return Err(bad(
                    w,
                    format!(
                        "{}+{} is beyond the region's {region_size} bytes",
                        w.offset, w.size
                    ),
                ));
            }
            for other in &windows[..i] {
                if other.name == w.name {
                    return Err(bad(w, "name used twice".into()));
                }
                if !allow_overlap && other.overlaps(w) {
                    return Err(bad(
                        w,
                        format!(
                            "overlaps window {}; pass --allow-overlap if two devices may expose the same bytes",
                            other.name
                        ),
                    ));
                }
            }
        }
        if windows.iter().filter(|w| w.serve.blk).count() > 1 {
            return Err(RegionError::BadWindow(
                "more than one window is served as blk; daxd serves one disk per process".into(),
            ));
        }
        Ok(Layout {
            windows,
            allow_overlap,
        })
    }

    /// The window served as the disk, if any.
    pub fn blk(&self) -> Option<&Window> {
        self.windows.iter().find(|w| w.serve.blk)
    }

    pub fn pmem(&self) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(|w| w.serve.pmem)
    }

    /// The pmem window holding bytes `offset..offset+len`, if one does.
    pub fn pmem_window_at(&self, offset: u64, len: u64) -> Option<&Window> {
        self.pmem()
            .find(|w| w.offset <= offset && offset.saturating_add(len) <= w.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    #[test]
    fn parses_option_strings() {
        let w = Window::parse("name=pm0,offset=1G,size=256M,serve=pmem").unwrap();
        assert_eq!(
            w,
            Window {
                name: "pm0".into(),
                offset: G,
                size: 256 * M,
                serve: Serve {
                    blk: false,
                    pmem: true
                }
            }
        );
        assert!(
            Window::parse("name=a,size=1M,serve=both")
                .unwrap()
                .serve
                .blk
        );
        for bad in [
            "name=a,size=1M",
            "size=1M,serve=blk",
            "name=a b,size=1M,serve=blk",
            "name=a,size=1M,serve=disk",
            "name=a,size=1M,serve=blk,colour=red",
            "name=a,size=lots,serve=blk",
            "name",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_windows_means_the_whole_region_as_a_disk() {
        let layout = Layout::new(4 * G, vec![], false).unwrap();
        assert_eq!(layout.blk().unwrap().size, 4 * G);
        assert_eq!(layout.pmem().count(), 0);
    }

    #[test]
    fn checks_alignment_bounds_names_and_overlap() {
        let w = |t: &str| Window::parse(t).unwrap();
        let ok = Layout::new(
            4 * G,
            vec![
                w("name=disk,offset=0,size=3G,serve=blk"),
                w("name=pm0,offset=3G,size=1G,serve=pmem"),
            ],
            false,
        )
        .unwrap();
        assert_eq!(ok.pmem_window_at(3 * G + 4096, 4096).unwrap().name, "pm0");
        assert!(ok.pmem_window_at(3 * G - 4096, 8192).is_none());

        let err = |windows: Vec<Window>, allow: bool| {
            Layout::new(4 * G, windows, allow).unwrap_err().to_string()
        };
        assert!(err(vec![w("name=p,offset=1M,size=2M,serve=pmem")], false).contains("2 MiB"));
        assert!(err(vec![w("name=p,offset=0,size=3M,serve=pmem")], false).contains("2 MiB"));
        assert!(err(vec![w("name=d,offset=512,size=1M,serve=blk")], false).contains("4 KiB"));
        assert!(err(vec![w("name=d,offset=3G,size=2G,serve=blk")], false).contains("beyond"));
        assert!(err(
            vec![
                w("name=d,size=1G,serve=blk"),
                w("name=d,offset=1G,size=1G,serve=pmem")
            ],
            false
        )
        .contains("twice"));
        let overlap = vec![
            w("name=disk,size=4G,serve=blk"),
            w("name=pm0,offset=2G,size=1G,serve=pmem"),
        ];
        assert!(err(overlap.clone(), false).contains("--allow-overlap"));
        assert!(Layout::new(4 * G, overlap, true).is_ok());
        assert!(err(
            vec![
                w("name=a,size=1G,serve=blk"),
                w("name=b,offset=1G,size=1G,serve=both")
            ],
            false
        )
        .contains("one disk"));
    }
}
