//! `daxd inspect --prometheus`: the Prometheus text exposition of an inspection.
//!
//! Written here rather than with the `prometheus-client` crate: that crate writes only the
//! OpenMetrics text format (counter families named without `_total`, `# UNIT` lines, a
//! closing `# EOF`), and the reader this output is for, node_exporter's textfile
//! collector, parses only the Prometheus text format 0.0.4 (node_exporter issue 1988;
//! OpenMetrics files from Rust exporters fail there with "text format parsing error").
//! The exposition is a snapshot of counters daxd keeps anyway, so a registry of live
//! metric objects would add a second copy of each without removing this code's job.

use std::fmt::Write as _;

use daxd_blk::stats::LatencyHistogram;

use super::protocol::Inspection;

/// A metric family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Prometheus text exposition (format 0.0.4) of an inspection.
pub fn prometheus(v: &Inspection) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "daxd_region_bytes",
        "gauge",
        "Size of the region file.",
    );
    let _ = writeln!(out, "daxd_region_bytes {}", v.region.size);
    family(
        &mut out,
        "daxd_registry_descriptors",
        "gauge",
        "Page descriptors for guest-visible pages.",
    );
    let _ = writeln!(out, "daxd_registry_descriptors {}", v.registry.descriptors);
    family(
        &mut out,
        "daxd_blk_region_flushes_total",
        "counter",
        "fdatasync calls for FLUSH requests.",
    );
    let _ = writeln!(
        out,
        "daxd_blk_region_flushes_total {}",
        v.blk.region_flushes
    );
    family(
        &mut out,
        "daxd_blk_writes_pwrite",
        "gauge",
        "1 while writes into allocated blocks go through pwrite(2), 0 through the mapping.",
    );
    let _ = writeln!(
        out,
        "daxd_blk_writes_pwrite {}",
        u8::from(v.blk.writes_pwrite)
    );
    family(
        &mut out,
        "daxd_blk_write_path_changes_total",
        "counter",
        "Changes of the write path by --write-path auto.",
    );
    let _ = writeln!(
        out,
        "daxd_blk_write_path_changes_total {}",
        v.blk.write_path_changes
    );
    let blk = &v.blk.queues;
    family(
        &mut out,
        "daxd_blk_requests_total",
        "counter",
        "Requests by queue and type.",
    );
    for q in blk {
        for (kind, n) in &q.requests {
            let _ = writeln!(
                out,
                "daxd_blk_requests_total{{queue=\"{}\",type=\"{}\"}} {n}",
                q.queue,
                kind.name()
            );
        }
    }
    family(
        &mut out,
        "daxd_blk_completions_total",
        "counter",
        "Completions by queue and status; dropped: chains without a status byte.",
    );
    for q in blk {
        for (status, n) in [
            ("ok", q.ok),
            ("ioerr", q.ioerr),
            ("unsupp", q.unsupp),
            ("dropped", q.dropped),
        ] {
            let _ = writeln!(
                out,
                "daxd_blk_completions_total{{queue=\"{}\",status=\"{status}\"}} {n}",
                q.queue
            );
        }
    }
    family(
        &mut out,
        "daxd_blk_bytes_total",
        "counter",
        "Bytes read from and written to the disk, by queue.",
    );
    for q in blk {
        for (direction, n) in [("read", q.bytes_read), ("write", q.bytes_written)] {
            let _ = writeln!(
                out,
                "daxd_blk_bytes_total{{queue=\"{}\",direction=\"{direction}\"}} {n}",
                q.queue
            );
        }
    }
    family(
        &mut out,
        "daxd_blk_flushes_in_flight",
        "gauge",
        "FLUSH requests waiting for the region flush, by queue.",
    );
    for q in blk {
        let _ = writeln!(
            out,
            "daxd_blk_flushes_in_flight{{queue=\"{}\"}} {}",
            q.queue, q.flushes_in_flight
        );
    }
    for (name, help, pick) in [
        (
            "daxd_blk_flush_latency_seconds",
            "FLUSH latency, from parsing to completion, by queue.",
            (|q| &q.flush_latency) as fn(&daxd_blk::stats::QueueMetrics) -> &LatencyHistogram,
        ),
        (
            "daxd_blk_request_latency_seconds",
            "Service time of every 64th other request, by queue.",
            |q| &q.request_latency,
        ),
    ] {
        family(&mut out, name, "histogram", help);
        for q in blk {
            let h = pick(q);
            let mut cumulative = 0;
            for (i, n) in h.counts.iter().enumerate() {
                cumulative += n;
                let le = h
                    .bounds_us
                    .get(i)
                    .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
                let _ = writeln!(
                    out,
                    "{name}_bucket{{queue=\"{}\",le=\"{le}\"}} {cumulative}",
                    q.queue
                );
            }
            let _ = writeln!(
                out,
                "{name}_sum{{queue=\"{}\"}} {}",
                q.queue,
                h.sum_ns as f64 / 1e9
            );
            let _ = writeln!(out, "{name}_count{{queue=\"{}\"}} {cumulative}", q.queue);
        }
    }
    if !v.faults.is_empty() {
        family(
            &mut out,
            "daxd_fault_hits_total",
            "counter",
            "Requests a fault rule acted on, by rule number.",
        );
        for rule in &v.faults {
            let _ = writeln!(
                out,
                "daxd_fault_hits_total{{rule=\"{}\"}} {}",
                rule.id, rule.hits
            );
        }
    }
    out
}
