//! Durability on persistent memory. Through a synchronous mapping (a file on a DAX file
//! system mapped with `MAP_SYNC`, or a device-DAX device) a store goes to the memory
//! itself, with no page cache in between; it is durable once the CPU has written its
//! cache line back and a fence has ordered that write-back before what follows. So a
//! FLUSH writes back the lines daxd stored into since the previous one (`DirtyPages`
//! knows which pages those are) instead of asking the kernel for an `fdatasync` of the
//! whole file; the instruction is the best the CPU has ([`CacheWriteBack`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::PAGE_SHIFT;

/// The instruction that writes a cache line back to memory, chosen at run time from what
/// the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheWriteBack {
    /// x86_64 `clwb`: writes the line back and may keep it cached.
    #[cfg(target_arch = "x86_64")]
    Clwb,
    /// x86_64 `clflushopt`: writes back and evicts, without ordering against other lines.
    #[cfg(target_arch = "x86_64")]
    Clflushopt,
    /// x86_64 `clflush`: writes back and evicts, ordered (slowest; every x86_64 has it).
    #[cfg(target_arch = "x86_64")]
    Clflush,
    /// aarch64 `dc cvap`: clean to the point of persistence (ARMv8.2 DCPoP).
    #[cfg(target_arch = "aarch64")]
    DcCvap,
    /// aarch64 `dc cvac`: clean to the point of coherency, where the CPU has no DCPoP.
    #[cfg(target_arch = "aarch64")]
    DcCvac,
}

impl CacheWriteBack {
    /// The best write-back this CPU has, and its cache line size; `None` on an
    /// architecture daxd cannot write cache lines back on.
    pub fn detect() -> Option<(CacheWriteBack, usize)> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid_count;
            let leaf7 = __cpuid_count(7, 0);
            let leaf1 = __cpuid_count(1, 0);
            // CPUID.1:EBX[15:8] is the line size clflush works on, in 8-byte units.
            let line = (((leaf1.ebx >> 8) & 0xff) as usize * 8).max(32);
            let how = if leaf7.ebx & (1 << 24) != 0 {
                CacheWriteBack::Clwb
            } else if leaf7.ebx & (1 << 23) != 0 {
                CacheWriteBack::Clflushopt
            } else {
                CacheWriteBack::Clflush
            };
            Some((how, line))
        }
        #[cfg(target_arch = "aarch64")]
        {
            let ctr: u64;
            // SAFETY: reads CTR_EL0, which Linux lets user space read (SCTLR_EL1.UCT); no
            // memory is touched.
            unsafe { std::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
            // CTR_EL0.DminLine (bits 19:16): log2 of the smallest data cache line in words.
            let line = 4usize << ((ctr >> 16) & 0xf);
            let how = if std::arch::is_aarch64_feature_detected!("dpb") {
                CacheWriteBack::DcCvap
            } else {
                CacheWriteBack::DcCvac
            };
            Some((how, line))
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        None
    }

    /// The instruction's name, for `daxd inspect` and the log.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            CacheWriteBack::Clwb => "clwb",
            #[cfg(target_arch = "x86_64")]
            CacheWriteBack::Clflushopt => "clflushopt",
            #[cfg(target_arch = "x86_64")]
            CacheWriteBack::Clflush => "clflush",
            #[cfg(target_arch = "aarch64")]
            CacheWriteBack::DcCvap => "dc cvap",
            #[cfg(target_arch = "aarch64")]
            CacheWriteBack::DcCvac => "dc cvac",
        }
    }

    /// Writes back every cache line of `len` bytes at `addr`, which must lie in a live
    /// mapping, lines of `line` bytes. Not ordered: [`CacheWriteBack::fence`] after the last.
    pub(crate) fn write_back(self, addr: *const u8, len: usize, line: usize) {
        let start = addr as usize & !(line - 1);
        let end = addr as usize + len;
        let mut at = start;
        while at < end {
            let p = at as *const u8;
            // SAFETY (every arm): the instruction reads no data and changes none; it only
            // writes the cache line holding `p` back to memory (evicting it for the flush
            // forms). `p` lies in a mapping the caller keeps alive, so it cannot fault.
            match self {
                #[cfg(target_arch = "x86_64")]
                CacheWriteBack::Clwb => {
                    // SAFETY: see above.
                    unsafe {
                        std::arch::asm!("clwb [{}]", in(reg) p, options(nostack, preserves_flags))
                    }
                }
                #[cfg(target_arch = "x86_64")]
                CacheWriteBack::Clflushopt => {
                    // SAFETY: see above.
                    unsafe {
                        std::arch::asm!("clflushopt [{}]", in(reg) p, options(nostack, preserves_flags))
                    }
                }
                #[cfg(target_arch = "x86_64")]
                CacheWriteBack::Clflush => {
                    // SAFETY: see above.
                    unsafe {
                        std::arch::asm!("clflush [{}]", in(reg) p, options(nostack, preserves_flags))
                    }
                }
                // `dc cvap` spelled as the system instruction it is, so that an assembler
                // without ARMv8.2 enabled takes it.
                #[cfg(target_arch = "aarch64")]
                CacheWriteBack::DcCvap => {
                    // SAFETY: see above.
                    unsafe {
                        std::arch::asm!("sys #3, c7, c12, #1, {}", in(reg) p, options(nostack, preserves_flags))
                    }
                }
                #[cfg(target_arch = "aarch64")]
                CacheWriteBack::DcCvac => {
                    // SAFETY: see above.
                    unsafe {
                        std::arch::asm!("dc cvac, {}", in(reg) p, options(nostack, preserves_flags))
                    }
                }
            }
            at += line;
        }
    }

    /// Orders every write-back before it ahead of later stores, and makes them complete.
    pub(crate) fn fence(self) {
        // SAFETY: a fence touches no memory and has no operands.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("sfence", options(nostack, preserves_flags));
        }
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!("dsb sy", options(nostack, preserves_flags));
        }
    }
}

/// Which 4 KiB pages of the region daxd has stored into since the last FLUSH took them:
/// one bit per page, and a summary bit per 64 pages so that a FLUSH finds the dirty ones
/// without reading the whole map (1 GiB of region: 32 KiB of bits and 512 bytes of
/// summary). Marking is two atomic ORs on the request path, taking is lock-free too: a
/// store marked after a FLUSH took its word is written back by the next FLUSH.
#[derive(Debug)]
pub(crate) struct DirtyPages {
    pages: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
}

impl DirtyPages {
    pub(crate) fn new(size: u64) -> DirtyPages {
        let words = (size >> PAGE_SHIFT).div_ceil(64);
        let zeroed = |n: u64| (0..n).map(|_| AtomicU64::new(0)).collect();
        DirtyPages {
            pages: zeroed(words),
            summary: zeroed(words.div_ceil(64)),
        }
    }

    /// Records that bytes `offset..offset+len` were stored into. After the stores: a FLUSH
    /// that sees the bits writes back what they wrote.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> PAGE_SHIFT;
        let last = (offset + len - 1) >> PAGE_SHIFT;
        let mut page = first;
        while page <= last {
            let word = (page / 64) as usize;
            let from = page % 64;
            let to = (last - word as u64 * 64).min(63);
            let bits = (u64::MAX >> (63 - to)) & (u64::MAX << from);
            if let Some(w) = self.pages.get(word) {
                w.fetch_or(bits, Ordering::Release);
                self.summary[word / 64].fetch_or(1 << (word % 64), Ordering::Release);
            }
            page = (word as u64 + 1) * 64;
        }
    }

    /// Takes every page marked so far, calling `dirty` with each run of dirty pages
    /// (`first_page`, `pages`), in order, and clears them.
    pub(crate) fn take(&self, mut dirty: impl FnMut(u64, u64)) {
        let mut run: Option<(u64, u64)> = None;
        for (s, summary) in self.summary.iter().enumerate() {
            let mut words = summary.swap(0, Ordering::Acquire);
            while words != 0 {
                let word = s * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                let mut bits = self.pages[word].swap(0, Ordering::Acquire);
                while bits != 0 {
                    let page = word as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    run = match run {
                        Some((first, n)) if first + n == page => Some((first, n + 1)),
                        Some((first, n)) => {
                            dirty(first, n);
                            Some((page, 1))
                        }
                        None => Some((page, 1)),
                    };
                }
            }
        }
        if let Some((first, n)) = run {
            dirty(first, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(dirty: &DirtyPages) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        dirty.take(|first, n| runs.push((first, n)));
        runs
    }

    #[test]
    fn marked_pages_come_back_once_as_runs() {
        let dirty = DirtyPages::new(1 << 30);
        dirty.mark(0, 1);
        dirty.mark(4096 * 5, 4096 * 3);
        // Across a word (page 63 to 64) and a summary word (page 4095 to 4096).
        dirty.mark(4096 * 63 + 100, 4096);
        dirty.mark(4096 * 4095, 8192);
        assert_eq!(taken(&dirty), [(0, 1), (5, 3), (63, 2), (4095, 2)]);
        assert_eq!(taken(&dirty), [], "taken pages are clean");
        dirty.mark(4096 * 70, 0);
        assert_eq!(taken(&dirty), [], "an empty store dirties nothing");
    }

    #[test]
    fn a_long_store_marks_every_page_it_touches() {
        let dirty = DirtyPages::new(1 << 30);
        dirty.mark(4095, 4096 * 200 + 2);
        assert_eq!(taken(&dirty), [(0, 202)]);
        // The region's last page, and nothing past it.
        let dirty = DirtyPages::new(64 * 4096 * 3 + 4096);
        dirty.mark(64 * 4096 * 3, 4096);
        assert_eq!(taken(&dirty), [(192, 1)]);
    }

    #[test]
    fn write_back_runs_over_memory_of_any_alignment() {
        let (how, line) = CacheWriteBack::detect().expect("x86_64 and aarch64 write back");
        assert!(line.is_power_of_two() && line >= 32, "{line}");
        let buf = vec![7u8; 3 * 4096 + 5];
        how.write_back(buf.as_ptr().wrapping_add(3), buf.len() - 3, line);
        how.fence();
        assert!(buf.iter().all(|&b| b == 7), "write-back changes no byte");
    }
}
