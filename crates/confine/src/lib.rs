//! How daxd confines itself before it serves: the process's view of the host
//! ([`sandbox`]), and what each thread may ask of the kernel: a seccomp allow-list per kind
//! of thread, installed by the thread itself before it handles anything a frontend or a
//! guest sent.
//!
//! Filters stack: a thread keeps the filters of the thread that created it and adds its
//! own, and a system call must pass all of them. So the list a thread installs is what it
//! does itself plus everything the threads it creates will do ([`ThreadKind::children`]),
//! and each of those narrows itself again when it starts. The threads and who creates
//! them:
//! - `main`: the daemon's event loop (signals, the control socket, shutdown and the final
//!   flush); it creates the server threads, then confines itself; it creates a config
//!   notifier per `daxd resize`.
//! - `server`: one per socket; accepts frontends and creates, per connection, the vhost-user
//!   message handler, the queue workers and the flusher.
//! - `handler`: the frontend's vhost-user messages (memory tables, rings, in-flight areas);
//!   it creates the pmem mapper.
//! - `queue-worker`: one per queue; guest requests.
//! - `flusher`: FLUSH requests (group commit).
//! - `pmem-mapper`: asks the frontend to map a pmem window (shared memory).
//! - `config-notifier`: tells the disk's frontend that the disk grew.
//!
//! Mode `kill` ends the process at the first system call outside its thread's list,
//! `trap` does the same after printing the call's number, `log` lets it through and has the
//! kernel log it (`journalctl -k`, `dmesg`: "audit: type=1326 ... syscall=N").

pub mod sandbox;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What to do with a system call outside the calling thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// End the process (`SECCOMP_RET_KILL_PROCESS`).
    Kill,
    /// Let it through and have the kernel log it (`SECCOMP_RET_LOG`).
    Log,
    /// Print the call's number and thread on standard error, then end the process.
    Trap,
    /// No filters.
    None,
}

/// How daxd reaches its region, which decides whether its threads need the file calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegionIo {
    /// A file or block device: reads of holes, writes into them, discards, fdatasync,
    /// and files of a `--record` log.
    #[default]
    SystemCalls,
    /// A device-DAX device without a `--record` log: loads, stores and cache write-back
    /// through the mapping, and no system call on the region or any file at all: the lists
    /// drop the file calls (`REGION_IO`).
    MappingOnly,
}

/// A kind of daxd thread (see the crate documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    Main,
    Server,
    Handler,
    QueueWorker,
    Flusher,
    PmemMapper,
    /// Tells the disk's frontend of a resize (`daxd resize`), for the main thread.
    ConfigNotifier,
}

/// Errors setting up or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot build the seccomp filter of the {kind} threads")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the seccomp filter of the {kind} threads")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("seccomp does not know this architecture ({0})")]
    Arch(&'static str),
    #[error("cannot handle SIGSYS for --seccomp trap")]
    Handler(#[source] nix::Error),
    #[error("cannot install the seccomp filter of a {kind} thread (a kernel without CONFIG_SECCOMP_FILTER?)")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("the seccomp filters were set up twice")]
    Twice,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Server,
        ThreadKind::Handler,
        ThreadKind::QueueWorker,
        ThreadKind::Flusher,
        ThreadKind::PmemMapper,
        ThreadKind::ConfigNotifier,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Server => "server",
            ThreadKind::Handler => "handler",
            ThreadKind::QueueWorker => "queue-worker",
            ThreadKind::Flusher => "flusher",
            ThreadKind::PmemMapper => "pmem-mapper",
            ThreadKind::ConfigNotifier => "config-notifier",
        }
    }

    /// The kinds of thread this kind creates (after its own filter is in place, so they
    /// start under it). `main` creates the servers before it confines itself.
    pub fn children(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::Main => &[ThreadKind::ConfigNotifier],
            ThreadKind::Server => &[
                ThreadKind::Handler,
                ThreadKind::QueueWorker,
                ThreadKind::Flusher,
            ],
            ThreadKind::Handler => &[ThreadKind::PmemMapper],
            ThreadKind::QueueWorker
            | ThreadKind::Flusher
            | ThreadKind::PmemMapper
            | ThreadKind::ConfigNotifier => &[],
        }
    }

    /// The lists of the system calls this kind of thread makes itself.
    fn lists(self) -> &'static [&'static [Call]] {
        match self {
            ThreadKind::Main => &[COMMON, STARTS_THREADS, MAIN, MAIN_LEGACY],
            ThreadKind::Server => &[COMMON, STARTS_THREADS, SERVER],
            ThreadKind::Handler => &[COMMON, STARTS_THREADS, HANDLER],
            ThreadKind::QueueWorker => &[COMMON, QUEUE_WORKER, QUEUE_WORKER_LEGACY],
            ThreadKind::Flusher => &[COMMON, FLUSHER],
            ThreadKind::PmemMapper => &[COMMON, PMEM_MAPPER],
            ThreadKind::ConfigNotifier => &[COMMON, CONFIG_NOTIFIER],
        }
    }

    /// The system calls this kind of thread makes itself, reaching the region by `io`.
    fn own(self, io: RegionIo) -> Vec<libc::c_long> {
        self.lists()
            .iter()
            .flat_map(|list| list.iter().map(|&(nr, _)| nr))
            // The handler's lseek is of memory tables and in-flight areas.
            .filter(|nr| {
                io == RegionIo::SystemCalls
                    || self == ThreadKind::Handler
                    || !REGION_IO.iter().any(|&(call, _)| call == *nr)
            })
            .collect()
    }

    /// The system calls a thread of this kind may make: its own and those of every thread
    /// it creates, which inherit its filter (for a region reached by system calls).
    pub fn allowed(self) -> BTreeSet<libc::c_long> {
        self.allowed_with(RegionIo::SystemCalls)
    }

    /// [`ThreadKind::allowed`] for a region reached by `io`.
    pub fn allowed_with(self, io: RegionIo) -> BTreeSet<libc::c_long> {
        let mut calls: BTreeSet<_> = self.own(io).into_iter().collect();
        for child in self.children() {
            calls.extend(child.allowed_with(io));
        }
        calls
    }

    /// The filter that lets this kind's calls through and meets any other with
    /// `mismatch`.
    fn program(self, mismatch: SeccompAction, io: RegionIo) -> Result<BpfProgram, ConfineError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| ConfineError::Arch(std::env::consts::ARCH))?;
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = self
            .allowed_with(io)
            .into_iter()
            .map(|call| (call, Vec::new()))
            .collect();
        let filter =
            SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(|source| {
                ConfineError::Build {
                    kind: self.name(),
                    source,
                }
            })?;
        filter.try_into().map_err(|source| ConfineError::Compile {
            kind: self.name(),
            source,
        })
    }
}

thread_local! {
    /// The list the thread installed last, for trap mode's message (a plain thread-local
    /// cell, readable in a signal handler).
    static CONFINED_AS: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

struct Policy {
    mode: Mode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Builds every kind's filter (so that a list that does not compile fails at start, not in
/// a thread) and, for `trap`, the SIGSYS handler. Threads confine themselves with [`enter`].
/// `io` says how daxd reaches its region: a device-DAX device only through its mapping,
/// which takes the file calls off every list.
pub fn init(mode: Mode, io: RegionIo) -> Result<(), ConfineError> {
    settle_malloc();
    let mismatch = match mode {
        Mode::Kill => Some(SeccompAction::KillProcess),
        Mode::Log => Some(SeccompAction::Log),
        Mode::Trap => Some(SeccompAction::Trap),
        Mode::None => None,
    };
    let mut programs = BTreeMap::new();
    if let Some(mismatch) = mismatch {
        for kind in ThreadKind::ALL {
            programs.insert(kind, kind.program(mismatch.clone(), io)?);
        }
    }
    if mode == Mode::Trap {
        trap::install()?;
    }
    POLICY
        .set(Policy { mode, programs })
        .map_err(|_| ConfineError::Twice)
}

/// Keeps glibc's malloc from opening files on confined threads. A confined thread may make
/// no openat(2), but malloc reads files lazily, on whichever thread gets there first
/// (glibc 2.36, Debian's build; found by reading malloc/ and by strace of daxd under
/// `--seccomp log`):
/// - the number of arenas: once 8 exist, `arena_get2` reads /sys/devices/system/cpu/online
///   (`__get_nprocs`) to decide how many more it may make, at a thread's first allocation.
///   A fixed bound (`M_ARENA_MAX`) settles the number without reading anything.
/// - heap shrinking: the first time a free shrinks a thread arena's heap (`heap_trim` ->
///   `shrink_heap`), `check_may_shrink_heap` reads /proc/sys/vm/overcommit_memory once
///   for the process. `heap_trim` shrinks only when the top chunk has at least
///   `M_TRIM_THRESHOLD` bytes, and a thread arena's heap is at most 64 MiB
///   (`HEAP_MAX_SIZE`; 4 huge pages with the `glibc.malloc.hugetlb` tunable), so the
///   largest threshold keeps the read from ever happening. The price: free memory at the
///   top of a heap stays mapped instead of being given back; daxd's request path
///   allocates nothing, so its heaps stay small.
///
/// Nothing else in malloc touches a file after start: the huge page settings are read by
/// `ptmalloc_init` at the first allocation, on the main thread before any filter;
/// `malloc_printerr` only writes to standard error (and aborts); `MALLOC_TRACE` is read
/// at start. A different allocator (jemalloc, mimalloc) reads /proc/sys/vm/overcommit_memory
/// at start too, and would add a C library for what two parameters settle.
fn settle_malloc() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes any positive int.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 8) };
        // SAFETY: as above; M_TRIM_THRESHOLD takes any non-negative int.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
    }
}

/// Confines the calling thread to its kind's list. Nothing happens before [`init`] (in
/// tests and fuzz targets, which run the same code) or in mode `none`.
pub fn enter(kind: ThreadKind) -> Result<(), ConfineError> {
    let Some(policy) = POLICY.get() else {
        return Ok(());
    };
    let Some(program) = policy.programs.get(&kind) else {
        return Ok(());
    };
    seccompiler::apply_filter(program).map_err(|source| ConfineError::Install {
        kind: kind.name(),
        source,
    })?;
    CONFINED_AS.with(|confined| confined.set(Some(kind)));
    log::debug!("{} thread confined ({:?})", kind.name(), policy.mode);
    Ok(())
}

/// [`enter`] for threads that cannot return an error: a thread that should be confined and
/// is not must not go on serving, so the process ends.
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        log::error!("{e}; exiting");
        std::process::exit(1);
    }
}

/// The name of system call `nr` on this architecture, for trap mode's message and the
/// lists printed by `daxd --print-seccomp`. Only calls in some list are named. Allocates
/// nothing: trap mode calls it in a signal handler.
pub fn syscall_name(nr: libc::c_long) -> Option<&'static str> {
    ThreadKind::ALL
        .iter()
        .flat_map(|kind| kind.lists().iter())
        .chain([OPENAT].iter())
        .flat_map(|list| list.iter())
        .find(|&&(n, _)| n == nr)
        .map(|&(_, name)| name.trim_start_matches("SYS_"))
}

/// A system call a list names: its number on this architecture and its libc name.
type Call = (libc::c_long, &'static str);

/// Calls by their libc names (`SYS_read`), numbered for the architecture built for: a
/// call the architecture lacks does not build, so lists differ by architecture only
/// where they say so.
macro_rules! calls {
    ($($sys:ident),* $(,)?) => {
        &[$((sys::$sys, stringify!($sys))),*]
    };
}

/// libc's system call numbers, and those it does not name yet.
#[allow(non_upper_case_globals)]
mod sys {
    pub use libc::*;
    /// Linux 6.5; the same number on every architecture.
    pub const SYS_cachestat: c_long = 451;
}

/// What every thread does.
const COMMON: &[Call] = calls![
    // Memory: the allocator, thread stacks, mappings of guest memory dropped.
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mprotect,
    // Locks, channels, time, and what std does around every thread.
    SYS_futex,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_getrandom,
    SYS_gettid,
    SYS_getpid,
    SYS_rseq,
    SYS_set_robust_list,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_restart_syscall,
    SYS_exit,
    SYS_exit_group,
    // Log lines (standard error), eventfd notifications, dropped descriptors;
    // tgkill: abort() after a failed check.
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_tgkill,
];

/// Starting threads that then install their own filters (kinds with children).
const STARTS_THREADS: &[Call] = calls![SYS_clone, SYS_clone3, SYS_prctl, SYS_seccomp];

/// The main thread's own calls.
const MAIN: &[Call] = calls![
    // The event loop.
    SYS_epoll_create1,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_read,
    // The control socket (`daxd inspect`).
    SYS_accept4,
    SYS_recvfrom,
    SYS_sendto,
    SYS_setsockopt,
    SYS_ioctl,
    SYS_fcntl,
    // Shutdown: waking an inherited socket's accept by connecting to it, the
    // systemd notification, the final fdatasync, removing socket files.
    SYS_socket,
    SYS_connect,
    SYS_sendmsg,
    SYS_shutdown,
    SYS_fdatasync,
    SYS_unlinkat,
    // A --record log: marks (`daxd mark`), the pages of a window QEMU maps
    // (compared with their shadow at each mark), the super block at shutdown.
    SYS_pread64,
    SYS_pwrite64,
];

/// A server thread's: accepting frontends.
const SERVER: &[Call] = calls![
    SYS_accept4,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_eventfd2,
    SYS_fcntl,
    SYS_ioctl,
    SYS_read,
    SYS_shutdown,
];

/// A connection's message handler's.
const HANDLER: &[Call] = calls![
    // The backend request channel (virtio-pmem's shared memory map) is checked
    // with getsockopt.
    SYS_getsockopt,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_read,
    SYS_shutdown,
    SYS_epoll_ctl,
    SYS_fcntl,
    // Memory tables and in-flight areas: their size checked, mapped.
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_lseek,
    SYS_memfd_create,
    SYS_ftruncate,
];

/// A queue worker's: guest requests.
const QUEUE_WORKER: &[Call] = calls![
    SYS_epoll_pwait,
    SYS_read,
    // Reads of a sparse region's holes (read(2) gives zeroes without allocating).
    SYS_pread64,
    // Discard and write-zeroes; --sync and FLUSH without a flusher thread.
    SYS_fallocate,
    SYS_lseek,
    SYS_pwrite64,
    SYS_fdatasync,
    // Before a FLUSH's fdatasync: what the writes since the last one dirtied.
    SYS_cachestat,
];

/// A --record log's FLUSH entries are written once the FLUSH's outcome is known;
/// cachestat as for queue workers.
const FLUSHER: &[Call] = calls![SYS_fdatasync, SYS_pwrite64, SYS_cachestat];

/// The pmem mapper's.
const PMEM_MAPPER: &[Call] = calls![
    // Filling the window's holes, then the map request and its reply.
    SYS_lseek,
    SYS_pread64,
    SYS_fallocate,
    SYS_pwrite64,
    SYS_fstat,
    SYS_statx,
    SYS_sendmsg,
    SYS_recvmsg,
];

/// The calls that reach the region's file (or a `--record` log's files): none of them is
/// allowed where the region is memory only ([`RegionIo::MappingOnly`]).
const REGION_IO: &[Call] = calls![
    SYS_pread64,
    SYS_pwrite64,
    SYS_fallocate,
    SYS_fdatasync,
    SYS_lseek,
    SYS_cachestat,
];

/// The config change on the backend channel, and the frontend's reply.
const CONFIG_NOTIFIER: &[Call] = calls![SYS_sendmsg, SYS_recvmsg];

/// The older calls x86_64 keeps next to their newer forms and glibc still uses there;
/// aarch64 has only the newer ones (epoll_pwait, unlinkat), which the lists name too.
#[cfg(target_arch = "x86_64")]
const MAIN_LEGACY: &[Call] = calls![SYS_epoll_wait, SYS_unlink];
#[cfg(not(target_arch = "x86_64"))]
const MAIN_LEGACY: &[Call] = &[];
#[cfg(target_arch = "x86_64")]
const QUEUE_WORKER_LEGACY: &[Call] = calls![SYS_epoll_wait];
#[cfg(not(target_arch = "x86_64"))]
const QUEUE_WORKER_LEGACY: &[Call] = &[];
/// Named for trap mode's message: the call a thread most likely makes when it should not.
const OPENAT: &[Call] = calls![SYS_openat];

/// `--seccomp trap`: a forbidden call raises SIGSYS on the thread that made it; the handler
/// says which call it was and ends the process.
mod trap {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    use super::ConfineError;

    pub(super) fn install() -> Result<(), ConfineError> {
        let action = SigAction::new(
            SigHandler::SigAction(forbidden),
            SaFlags::SA_SIGINFO,
            SigSet::empty(),
        );
        // SAFETY: `forbidden` only makes async-signal-safe calls (write, _exit) on memory of
        // its own stack.
        unsafe { sigaction(Signal::SIGSYS, &action) }
            .map(drop)
            .map_err(ConfineError::Handler)
    }

    /// Where `siginfo_t` keeps the number of the call that raised SIGSYS on 64-bit Linux
    /// (`_sigsys._syscall`: after si_signo, si_errno, si_code and padding, and the 8-byte
    /// `_call_addr`).
    const SI_SYSCALL_OFFSET: usize = 24;

    extern "C" fn forbidden(
        _signal: libc::c_int,
        info: *mut libc::siginfo_t,
        _context: *mut libc::c_void,
    ) {
        let at = info.cast::<u8>().wrapping_add(SI_SYSCALL_OFFSET);
        // SAFETY: the kernel passes a valid siginfo_t, whose union holds `_sigsys` for a
        // SIGSYS raised by seccomp; the field is an int at this offset.
        let nr = unsafe { at.cast::<i32>().read_unaligned() };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        let mut line = Line::default();
        line.push(b"daxd: seccomp: ");
        let kind = super::CONFINED_AS
            .try_with(std::cell::Cell::get)
            .ok()
            .flatten();
        // A thread that has not installed its own list yet runs under its creator's.
        line.push(kind.map_or("starting", super::ThreadKind::name).as_bytes());
        line.push(b" thread ");
        line.number(tid);
        line.push(b" made system call ");
        line.number(libc::c_long::from(nr));
        if let Some(name) = super::syscall_name(libc::c_long::from(nr)) {
            line.push(b" (");
            line.push(name.as_bytes());
            line.push(b")");
        }
        line.push(b", which its list does not allow; exiting (--seccomp)\n");
        // SAFETY: writes bytes of a live stack buffer to standard error.
        unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
        // SAFETY: ends the process at once, as SECCOMP_RET_KILL_PROCESS would.
        unsafe { libc::_exit(128 + libc::SIGSYS) };
    }

    /// A line formatted without allocating (inside a signal handler).
    struct Line {
        buf: [u8; 256],
        len: usize,
    }

    impl Default for Line {
        fn default() -> Line {
            Line {
                buf: [0; 256],
                len: 0,
            }
        }
    }

    impl Line {
        fn push(&mut self, bytes: &[u8]) {
            let n = bytes.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
        }

        fn number(&mut self, mut n: libc::c_long) {
            let mut digits = [0u8; 20];
            let mut i = digits.len();
            let negative = n < 0;
            loop {
                i -= 1;
                digits[i] = b'0' + (n % 10).unsigned_abs() as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            if negative {
                self.push(b"-");
            }
            self.push(&digits[i..]);
        }
    }
}

#[cfg(test)]
mod tests;
