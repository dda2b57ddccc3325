//! daxd-bench: daxd against qemu-storage-daemon's vhost-user-blk export, on one file, with
//! one client (libblkio's `virtio-blk-vhost-user` driver), runs alternating A B A B.
//!
//! Each run starts the backend fresh on the same prefilled file, connects one client
//! thread per queue with a fixed number of requests in flight and preallocated buffers,
//! and measures for a fixed time after a short warm-up. Ratios are medians over the A/B
//! pairs of the same invocation, so they compare like with like on a noisy machine.

use std::fmt::Write as _;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    about = "Benchmark daxd against qemu-storage-daemon (vhost-user-blk) with the same blkio client"
)]
struct Args {
    /// Size of the benchmark file in MiB.
    #[arg(long = "size-mib", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..), value_name = "MIB")]
    size_mib: u64,
    /// Seconds measured per run (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// A/B pairs per workload.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Workloads to run (comma separated names; default all). See --list.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// List the workloads and exit.
    #[arg(long)]
    list: bool,
    /// Directory for the benchmark file, sockets and results.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// daxd binary (default: the daxd next to this program).
    #[arg(long)]
    daxd: Option<PathBuf>,
    /// qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// How both backends are started: equal-polling (daxd --poll-us and an iothread for
    /// qemu-storage-daemon's export with poll-max-ns, both --backend-poll-us), defaults
    /// (each as a user starts it: daxd without options, qemu-storage-daemon's export in
    /// its main loop), or qsd-iothread (daxd without options, qemu-storage-daemon's export
    /// in an iothread with QEMU's own polling default, its fastest configuration here).
    #[arg(long, value_enum, default_value_t = Setup::EqualPolling)]
    config: Setup,
    /// After the first run of each backend, leave the client connected and idle for this
    /// many seconds and report the backend's CPU use meanwhile (0: skip).
    #[arg(long, default_value_t = 0.0)]
    idle_seconds: f64,
    /// Let the client busy-poll for completions (blkio poll queues) instead of waiting on
    /// its completion eventfd, for both backends; takes the client's own wake-ups out of
    /// the latency.
    #[arg(long)]
    client_poll: bool,
    /// With --config equal-polling, the busy-poll budget given to both backends, in
    /// microseconds: daxd --poll-us, and qemu-storage-daemon's iothread poll-max-ns (its
    /// adaptive polling). 0: no polling.
    #[arg(long, default_value_t = 200)]
    backend_poll_us: u64,
    /// The file each run starts from: prefilled (written once with 1 MiB writes and kept,
    /// its page cache warm), sparse (a new file with no blocks), cold (prefilled, its page
    /// cache dropped), copied (a prefilled source copied in with `cp`, then synced) or
    /// converted (the source written by `qemu-img convert`, then synced). The last four
    /// are made again before every run, the same for both backends.
    #[arg(long, value_enum, default_value_t = State::Prefilled)]
    state: State,
    /// An extra argument for daxd (repeatable).
    #[arg(long = "daxd-arg", value_name = "ARG", allow_hyphen_values = true)]
    daxd_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Setup {
    EqualPolling,
    Defaults,
    QsdIothread,
}

impl Setup {
    fn describe(self, poll_us: u64) -> String {
        match self {
            Setup::EqualPolling => format!(
                "equal polling: daxd --poll-us {poll_us}, qsd export in an iothread with poll-max-ns={}",
                poll_us * 1000
            ),
            Setup::Defaults => {
                "defaults: daxd without options, qsd export in its main loop".to_owned()
            }
            Setup::QsdIothread => {
                "daxd without options, qsd export in an iothread (QEMU's polling default)"
                    .to_owned()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum State {
    Prefilled,
    Sparse,
    Cold,
    Copied,
    Converted,
}

impl State {
    /// Puts `file` (`size` bytes) into this state; `source` is a prefilled file to copy.
    fn prepare(self, file: &Path, source: &Path, size: u64) {
        match self {
            State::Prefilled => prefill(file, size),
            State::Sparse => {
                let _ = std::fs::remove_file(file);
                std::fs::File::create(file)
                    .and_then(|f| f.set_len(size))
                    .expect("create the sparse benchmark file");
            }
            State::Cold => {
                prefill(file, size);
                let f = std::fs::File::open(file).expect("open the benchmark file");
                f.sync_all().expect("sync the benchmark file");
                rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
                    .expect("drop the benchmark file's page cache");
            }
            State::Copied | State::Converted => {
                prefill(source, size);
                let _ = std::fs::remove_file(file);
                let mut command = if self == State::Copied {
                    let mut c = Command::new("cp");
                    c.arg(source).arg(file);
                    c
                } else {
                    let mut c = Command::new("qemu-img");
                    c.args(["convert", "-f", "raw", "-O", "raw"])
                        .arg(source)
                        .arg(file);
                    c
                };
                let status = command.status().expect("run cp or qemu-img");
                assert!(status.success(), "{command:?}: {status}");
                std::fs::File::open(file)
                    .and_then(|f| f.sync_all())
                    .expect("sync the benchmark file");
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    kind: Kind,
    block: usize,
    depth: usize,
    queues: usize,
    /// Send a FLUSH after every this many writes (0: never).
    flush_every: u32,
}

const fn w(
    name: &'static str,
    kind: Kind,
    block: usize,
    depth: usize,
    queues: usize,
    flush_every: u32,
) -> Workload {
    Workload {
        name,
        kind,
        block,
        depth,
        queues,
        flush_every,
    }
}

const WORKLOADS: &[Workload] = &[
    w("randread-4k-qd1", Kind::RandRead, 4096, 1, 1, 0),
    w("randread-4k-qd32", Kind::RandRead, 4096, 32, 1, 0),
    w("randwrite-4k-qd1", Kind::RandWrite, 4096, 1, 1, 0),
    w("randwrite-4k-qd32", Kind::RandWrite, 4096, 32, 1, 0),
    w("seqread-128k-qd8", Kind::SeqRead, 128 << 10, 8, 1, 0),
    w("seqwrite-128k-qd8", Kind::SeqWrite, 128 << 10, 8, 1, 0),
    w("randread-4k-qd32-2q", Kind::RandRead, 4096, 32, 2, 0),
    w("randwrite-4k-qd32-2q", Kind::RandWrite, 4096, 32, 2, 0),
    w("seqread-128k-qd8-2q", Kind::SeqRead, 128 << 10, 8, 2, 0),
    w("randread-4k-qd32-4q", Kind::RandRead, 4096, 32, 4, 0),
    w("randwrite-4k-qd32-4q", Kind::RandWrite, 4096, 32, 4, 0),
    w("seqread-128k-qd8-4q", Kind::SeqRead, 128 << 10, 8, 4, 0),
    w("flushwrite-4k-qd8-every16", Kind::RandWrite, 4096, 8, 1, 16),
    w("flushwrite-4k-qd1-every1", Kind::RandWrite, 4096, 1, 1, 1),
    w(
        "flushwrite-64k-seq-qd8-every64m",
        Kind::SeqWrite,
        64 << 10,
        8,
        1,
        1024,
    ),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Daxd,
    Qsd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Daxd => "daxd",
            Backend::Qsd => "qsd",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
struct RunStats {
    ops: u64,
    bytes: u64,
    elapsed: f64,
    /// Seconds of the measurement during which at least one FLUSH was in flight: near
    /// `elapsed`, the workload waits on the backend's flush (`fdatasync`) all the time.
    flush_busy: f64,
    latencies_ns: Vec<u32>,
    /// The backend's resident memory outside the benchmark file's mapping, at the end of
    /// the measurement, in KiB.
    rss_kib: u64,
    /// CPU the backend used during the measurement, in cores (1.0 = one core busy).
    cpu_cores: f64,
    /// CPU the backend used while the client stayed connected and idle after the load
    /// (--idle-seconds), in cores.
    idle_cores: Option<f64>,
    /// Bytes the host block device under the file wrote from the backend's start to its
    /// exit (its final flush included), if the device's counters could be read.
    device_bytes: Option<u64>,
}

impl RunStats {
    /// Host device bytes written per byte the client wrote (the client's bytes counted
    /// over the measured seconds, so the warm-up's writes make it a little high). NaN
    /// without device counters or without writes.
    fn write_amplification(&self) -> f64 {
        match self.device_bytes {
            Some(device) if self.bytes > 0 => device as f64 / self.bytes as f64,
            _ => f64::NAN,
        }
    }

    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed
    }

    /// Share of the measured time with a FLUSH in flight, in per cent.
    fn flush_share(&self) -> f64 {
        100.0 * self.flush_busy / self.elapsed
    }
    /// Requests per second of backend CPU time.
    fn iops_per_cpu_s(&self) -> f64 {
        self.iops() / self.cpu_cores
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed / (1 << 20) as f64
    }
    fn percentile_us(&mut self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        self.latencies_ns.sort_unstable();
        let i = ((self.latencies_ns.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_ns[i]) / 1000.0
    }
}

fn main() {
    let args = Args::parse();
    if args.list {
        for w in WORKLOADS {
            println!("{}", w.name);
        }
        return;
    }
    let selected: Vec<Workload> = if args.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        args.workloads
            .iter()
            .map(|name| {
                *WORKLOADS
                    .iter()
                    .find(|w| w.name == name)
                    .unwrap_or_else(|| panic!("unknown workload {name}; see --list"))
            })
            .collect()
    };
    let daxd = args.daxd.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("daxd")
    });
    assert!(
        daxd.exists(),
        "{} not found: build it with cargo build --release -p daxd",
        daxd.display()
    );
    std::fs::create_dir_all(&args.dir).expect("create the benchmark directory");
    let file = args.dir.join("bench.img");
    let source = args.dir.join("source.img");
    args.state.prepare(&file, &source, args.size_mib << 20);

    let csv_path = args.dir.join("results.csv");
    let mut csv = String::from(
        "workload,backend,round,iops,mib_s,p50_us,p99_us,rss_kib,cpu_cores,iops_per_cpu_s\n",
    );
    println!(
        "{} s per run, {} A/B pairs, file {} ({} MiB, {:?}; host page cache for both: \
         daxd maps it shared; qsd uses aio=io_uring,cache.direct=off); {}; \
         daxd args: {:?}; client {}",
        args.seconds,
        args.rounds,
        file.display(),
        args.size_mib,
        args.state,
        args.config.describe(args.backend_poll_us),
        args.daxd_args,
        if args.client_poll {
            "polls for completions"
        } else {
            "waits on its completion eventfd"
        }
    );
    println!(
        "{:<27} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>9} {:>9} {:>11} {:>9}",
        "workload",
        "daxd IOPS",
        "qsd IOPS",
        "daxd MiB",
        "qsd MiB",
        "d p50us",
        "q p50us",
        "d p99us",
        "q p99us",
        "ratio",
        "p50 d/q",
        "d RSS MiB",
        "CPU d/q",
        "IOPS/CPU",
        "WA d/q",
        "FLUSH% d/q"
    );
    let mut summaries = Vec::new();
    let mut idle_lines = Vec::new();
    for (index, workload) in selected.iter().enumerate() {
        let mut pairs: Vec<(RunStats, RunStats)> = Vec::new();
        for round in 0..args.rounds {
            let idle = if index == 0 && round == 0 {
                args.idle_seconds
            } else {
                0.0
            };
            let mut runs = [Backend::Daxd, Backend::Qsd]
                .map(|backend| run(&args, &daxd, &file, backend, workload, round, idle));
            for (backend, stats) in [Backend::Daxd, Backend::Qsd].iter().zip(runs.iter_mut()) {
                let _ = writeln!(
                    csv,
                    "{},{},{},{:.0},{:.1},{:.1},{:.1},{},{:.2},{:.0}",
                    workload.name,
                    backend.name(),
                    round,
                    stats.iops(),
                    stats.mib_s(),
                    stats.percentile_us(0.5),
                    stats.percentile_us(0.99),
                    stats.rss_kib,
                    stats.cpu_cores,
                    stats.iops_per_cpu_s()
                );
                if let Some(idle) = stats.idle_cores {
                    idle_lines.push(format!(
                        "{}: {:.2}% of one core over {} s idle after {}",
                        backend.name(),
                        idle * 100.0,
                        args.idle_seconds,
                        workload.name
                    ));
                }
            }
            let [a, b] = runs;
            pairs.push((a, b));
        }
        summaries.push(report(workload, &mut pairs));
    }
    for line in &idle_lines {
        println!("idle CPU, {line}");
    }
    std::fs::write(&csv_path, csv).expect("write results");
    let svg_path = args.dir.join("results.svg");
    std::fs::write(&svg_path, chart(&summaries)).expect("write the chart");
    println!("results: {} and {}", csv_path.display(), svg_path.display());
}

/// One workload's medians over the A/B pairs.
struct Summary {
    name: &'static str,
    daxd_iops: f64,
    qsd_iops: f64,
    /// Median over pairs of daxd IOPS / qsd IOPS.
    ratio: f64,
}

/// A bar chart of daxd/qsd IOPS ratios per workload, with each pair's IOPS as labels.
fn chart(summaries: &[Summary]) -> String {
    let row = 34.0;
    let left = 230.0;
    let width = 520.0;
    let max_ratio = summaries.iter().map(|s| s.ratio).fold(2.0f64, f64::max) * 1.1;
    let height = 70.0 + row * summaries.len() as f64;
    let x = |ratio: f64| left + width * ratio / max_ratio;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="14">daxd vs qemu-storage-daemon (vhost-user-blk, same blkio client): IOPS ratio, median of A/B pairs</text>
"#,
        w = left + width + 150.0
    );
    for (i, s) in summaries.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let colour = if s.ratio >= 1.0 { "#2b8a3e" } else { "#c92a2a" };
        let _ = writeln!(
            svg,
            r#"<text x="{tx}" y="{ty}" text-anchor="end">{name}</text><rect x="{left}" y="{y}" width="{bw:.1}" height="22" fill="{colour}"/><text x="{lx:.1}" y="{ty}">{ratio:.2}x ({d:.0} vs {q:.0} IOPS)</text>"#,
            tx = left - 8.0,
            ty = y + 15.0,
            name = s.name,
            bw = x(s.ratio) - left,
            lx = x(s.ratio) + 6.0,
            ratio = s.ratio,
            d = s.daxd_iops,
            q = s.qsd_iops,
        );
    }
    for mark in [1.0, 2.0] {
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="32" x2="{x:.1}" y2="{y2}" stroke="#555" stroke-dasharray="4 3"/><text x="{x:.1}" y="{ty}" text-anchor="middle">{mark:.0}x</text>"##,
            x = x(mark),
            y2 = height - 20.0,
            ty = height - 6.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn report(workload: &Workload, pairs: &mut [(RunStats, RunStats)]) -> Summary {
    let ratio = median(pairs.iter().map(|(d, q)| d.iops() / q.iops()).collect());
    let p50_ratio = median(
        pairs
            .iter_mut()
            .map(|(d, q)| d.percentile_us(0.5) / q.percentile_us(0.5))
            .collect(),
    );
    let rss_mib = pairs.iter().map(|(d, _)| d.rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    // Requests per backend CPU-second, daxd's over qsd's.
    let efficiency = median(
        pairs
            .iter()
            .map(|(d, q)| d.iops_per_cpu_s() / q.iops_per_cpu_s())
            .collect(),
    );
    let mut med = |f: &mut dyn FnMut(&mut RunStats) -> f64, daxd: bool| {
        median(
            pairs
                .iter_mut()
                .map(|(d, q)| if daxd { f(d) } else { f(q) })
                .collect(),
        )
    };
    let daxd_iops = med(&mut |s| s.iops(), true);
    let qsd_iops = med(&mut |s| s.iops(), false);
    println!(
        "{:<27} {:>10.0} {:>10.0} {:>9.1} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6.2}x {:>7.2} {:>8.1} {:>4.2}/{:<4.2} {:>8.2}x {:>5}/{:<5} {:>4.0}/{:<4.0}",
        workload.name,
        daxd_iops,
        qsd_iops,
        med(&mut |s| s.mib_s(), true),
        med(&mut |s| s.mib_s(), false),
        med(&mut |s| s.percentile_us(0.5), true),
        med(&mut |s| s.percentile_us(0.5), false),
        med(&mut |s| s.percentile_us(0.99), true),
        med(&mut |s| s.percentile_us(0.99), false),
        ratio,
        p50_ratio,
        rss_mib,
        med(&mut |s| s.cpu_cores, true),
        med(&mut |s| s.cpu_cores, false),
        efficiency,
        wa(med(&mut |s| s.write_amplification(), true)),
        wa(med(&mut |s| s.write_amplification(), false)),
        med(&mut |s| s.flush_share(), true),
        med(&mut |s| s.flush_share(), false)
    );
    let _ = std::io::stdout().flush();
    Summary {
        name: workload.name,
        daxd_iops,
        qsd_iops,
        ratio,
    }
}

/// A write amplification for the table: "-" where the run wrote nothing (reads).
fn wa(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.1}")
    } else {
        "-".to_owned()
    }
}

/// Writes the whole file once so reads hit data, not holes, for both backends.
fn prefill(file: &Path, size: u64) {
    if std::fs::metadata(file)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return;
    }
    let _ = std::fs::remove_file(file);
    let mut out = std::fs::File::create(file).expect("create the benchmark file");
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..size >> 20 {
        out.write_all(&chunk).expect("prefill");
    }
    out.sync_all().expect("sync the benchmark file");
}

fn start_backend(
    args: &Args,
    daxd: &Path,
    file: &Path,
    backend: Backend,
    queues: usize,
) -> (Child, PathBuf) {
    let socket = args.dir.join(format!("{}.sock", backend.name()));
    let _ = std::fs::remove_file(&socket);
    let mut command = match backend {
        Backend::Daxd => {
            let mut c = Command::new(daxd);
            c.arg("--region")
                .arg(file)
                .arg("--socket-path")
                .arg(&socket)
                .arg("--num-queues")
                .arg(queues.to_string())
                .args(&args.daxd_args)
                .env("RUST_LOG", "warn");
            if args.config == Setup::EqualPolling {
                c.arg(format!("--poll-us={}", args.backend_poll_us));
            }
            c
        }
        Backend::Qsd => {
            let mut c = Command::new(&args.qsd);
            let iothread = match args.config {
                Setup::EqualPolling => {
                    c.arg("--object").arg(format!(
                        "iothread,id=iot0,poll-max-ns={}",
                        args.backend_poll_us * 1000
                    ));
                    ",iothread=iot0"
                }
                Setup::QsdIothread => {
                    c.arg("--object").arg("iothread,id=iot0");
                    ",iothread=iot0"
                }
                Setup::Defaults => "",
            };
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f,filename={},aio=io_uring,cache.direct=off",
                    file.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}{iothread}",
                    socket.display()
                ));
            c
        }
    };
    let mut child = command
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", backend.name()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited at start-up: {status}", backend.name());
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen",
            backend.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The probe connection above is served and dropped by the backend before the next
    // accept; give it a moment so the client's connection is not the one refused.
    std::thread::sleep(Duration::from_millis(100));
    (child, socket)
}

fn run(
    args: &Args,
    daxd: &Path,
    file: &Path,
    backend: Backend,
    workload: &Workload,
    round: usize,
    idle_seconds: f64,
) -> RunStats {
    if args.state != State::Prefilled {
        args.state
            .prepare(file, &args.dir.join("source.img"), args.size_mib << 20);
    }
    // Start every run from a clean file: dirty pages left by the previous run would make
    // this run's first flushes pay for writes it did not make.
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .expect("sync the benchmark file");
    let written_before = device_bytes_written(file);
    let (mut child, socket) = start_backend(args, daxd, file, backend, workload.queues);
    let pid = child.id();
    let file = file.canonicalize().unwrap_or_else(|_| file.to_owned());
    let mut stats = drive(
        &socket,
        workload,
        args.seconds,
        round as u64,
        args.client_poll,
        idle_seconds,
        || (rss_kib_excluding(pid, &file), cpu_seconds(pid)),
    );
    terminate(&mut child);
    if matches!(workload.kind, Kind::RandWrite | Kind::SeqWrite) {
        stats.device_bytes = written_before
            .zip(device_bytes_written(&file))
            .map(|(before, after)| after.saturating_sub(before));
    }
    stats
}

/// Bytes written so far by the block device that holds `file`, from its counters in
/// /sys/dev/block/MAJOR:MINOR/stat (the seventh field counts 512-byte sectors written).
/// Other writers of the device count too: run on an otherwise quiet machine.
fn device_bytes_written(file: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file).ok()?.dev();
    let stat = std::fs::read_to_string(format!(
        "/sys/dev/block/{}:{}/stat",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ))
    .ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

/// Stops a backend with SIGTERM, its normal way out, and reaps it.
fn terminate(child: &mut std::process::Child) {
    let pid = rustix::process::Pid::from_child(child);
    if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
        eprintln!("cannot stop backend {pid:?}: {e}");
    }
    if let Err(e) = child.wait() {
        eprintln!("cannot reap backend {pid:?}: {e}");
    }
}

/// User plus system CPU time of process `pid` so far, in seconds (/proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    ticks as f64 / rustix::param::clock_ticks_per_second().max(1) as f64
}

/// Resident memory of process `pid` outside mappings of `file`, in KiB, from
/// /proc/PID/smaps (the region mapping is the file's page cache, not daxd's own memory).
fn rss_kib_excluding(pid: u32, file: &Path) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let file = file.to_string_lossy();
    let mut total = 0;
    let mut counted = true;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            // Mapping headers start with an address range "start-end".
            Some(first)
                if first.contains('-')
                    && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') =>
            {
                counted = !line.ends_with(file.as_ref());
            }
            Some("Rss:") if counted => {
                total += fields
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    total
}

/// Runs the workload from one thread per queue and merges their numbers; `rss` samples the
/// backend's memory while the load is still on.
fn drive(
    socket: &Path,
    workload: &Workload,
    seconds: f64,
    seed: u64,
    client_poll: bool,
    idle_seconds: f64,
    sample: impl Fn() -> (u64, f64),
) -> RunStats {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    blkio.set_str("path", socket.to_str().unwrap()).unwrap();
    blkio
        .connect()
        .unwrap_or_else(|e| panic!("connect: {}", e.message()));
    let (queues, poll_queues) = if client_poll {
        (0, workload.queues as i32)
    } else {
        (workload.queues as i32, 0)
    };
    blkio.set_i32("num-queues", queues).unwrap();
    blkio.set_i32("num-poll-queues", poll_queues).unwrap();
    let started = blkio
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.message()));
    let client_queues = if client_poll {
        started.poll_queues
    } else {
        started.queues
    };
    let capacity = blkio.get_u64("capacity").unwrap();
    let per_queue = workload.depth * workload.block;
    let region = blkio
        .alloc_mem_region((per_queue * workload.queues).next_multiple_of(4096))
        .unwrap();
    blkio.map_mem_region(&region).unwrap();

    let warmup = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(seconds);
    let begin = Instant::now() + Duration::from_millis(50);
    let threads: Vec<_> = client_queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let workload = *workload;
            let buf = region.addr + i * per_queue;
            std::thread::spawn(move || {
                queue_loop(
                    q,
                    buf,
                    &workload,
                    capacity,
                    begin,
                    warmup,
                    measure,
                    seed * 1000 + i as u64,
                )
            })
        })
        .collect();
    // Sample the backend's CPU time over most of the measurement, and its memory near
    // the end, under load.
    let from = begin + warmup;
    std::thread::sleep(from.saturating_duration_since(Instant::now()));
    let (_, cpu_before) = sample();
    let counted_from = Instant::now();
    std::thread::sleep((from + measure.mul_f64(0.9)).saturating_duration_since(Instant::now()));
    let (rss_kib, cpu_after) = sample();
    let mut total = RunStats {
        rss_kib,
        cpu_cores: (cpu_after - cpu_before) / counted_from.elapsed().as_secs_f64(),
        ..RunStats::default()
    };
    for t in threads {
        let s = t.join().expect("queue thread");
        total.ops += s.ops;
        total.bytes += s.bytes;
        total.elapsed = s.elapsed.max(total.elapsed);
        // (The FLUSH workloads use one queue; with more, the busiest queue's share.)
        total.flush_busy = s.flush_busy.max(total.flush_busy);
        total.latencies_ns.extend(s.latencies_ns);
    }
    if idle_seconds > 0.0 {
        // The client stays connected (as a VM whose guest stopped doing I/O); only the
        // backend's own waiting costs CPU now.
        let (_, before) = sample();
        let from = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(idle_seconds));
        let (_, after) = sample();
        total.idle_cores = Some((after - before) / from.elapsed().as_secs_f64());
    }
    drop(blkio);
    total
}

#[allow(clippy::too_many_arguments)]
fn queue_loop(
    mut q: Blkioq,
    buf: usize,
    w: &Workload,
    capacity: u64,
    begin: Instant,
    warmup: Duration,
    measure: Duration,
    seed: u64,
) -> RunStats {
    let blocks = capacity / w.block as u64;
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next_offset = |slot: usize, n: u64| -> u64 {
        match w.kind {
            Kind::RandRead | Kind::RandWrite => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % blocks) * w.block as u64
            }
            Kind::SeqRead | Kind::SeqWrite => {
                ((n * w.depth as u64 + slot as u64) % blocks) * w.block as u64
            }
        }
    };
    let is_write = matches!(w.kind, Kind::RandWrite | Kind::SeqWrite);
    let mut started_at = vec![Instant::now(); w.depth];
    let mut is_flush = vec![false; w.depth];
    let mut issued = vec![0u64; w.depth];
    let mut writes = 0u32;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut stats = RunStats {
        latencies_ns: Vec::with_capacity(1 << 20),
        ..RunStats::default()
    };

    while Instant::now() < begin {
        std::hint::spin_loop();
    }
    let measure_from = begin + warmup;
    let end = measure_from + measure;

    let submit = |q: &mut Blkioq, slot: usize, offset: u64, flush: bool| {
        let ptr = (buf + slot * w.block) as *mut u8;
        if flush {
            q.flush(slot, ReqFlags::empty());
        } else if is_write {
            q.write(offset, ptr, w.block, slot, ReqFlags::empty());
        } else {
            q.read(offset, ptr, w.block, slot, ReqFlags::empty());
        }
    };
    for slot in 0..w.depth {
        let offset = next_offset(slot, 0);
        issued[slot] = 1;
        started_at[slot] = Instant::now();
        submit(&mut q, slot, offset, false);
    }
    let mut in_flight = w.depth;
    let mut stop = false;
    // FLUSHes in flight, and since when at least one has been.
    let mut flushes = 0u32;
    let mut flushing_since = Instant::now();
    while in_flight > 0 {
        let n = q
            .do_io(&mut completions, 1, None, None)
            .unwrap_or_else(|e| panic!("do_io: {}", e.message()));
        let now = Instant::now();
        if now >= end {
            stop = true;
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert!(c.ret == 0, "request failed: {}", c.ret);
            let slot = c.user_data;
            if is_flush[slot] {
                flushes -= 1;
                if flushes == 0 {
                    let from = flushing_since.max(measure_from);
                    let to = now.min(end);
                    stats.flush_busy += to.saturating_duration_since(from).as_secs_f64();
                }
            }
            if now >= measure_from && now < end && !is_flush[slot] {
                stats.ops += 1;
                stats.bytes += w.block as u64;
                let ns = now.duration_since(started_at[slot]).as_nanos();
                stats.latencies_ns.push(ns.min(u128::from(u32::MAX)) as u32);
            }
            if stop {
                in_flight -= 1;
                continue;
            }
            let flush = if is_write && w.flush_every > 0 && !is_flush[slot] {
                writes += 1;
                writes % w.flush_every == 0
            } else {
                false
            };
            is_flush[slot] = flush;
            if flush {
                if flushes == 0 {
                    flushing_since = now;
                }
                flushes += 1;
            }
            let offset = next_offset(slot, issued[slot]);
            issued[slot] += 1;
            started_at[slot] = now;
            submit(&mut q, slot, offset, flush);
        }
    }
    stats.elapsed = measure.as_secs_f64();
    stats
}
