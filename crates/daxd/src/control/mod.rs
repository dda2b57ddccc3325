//! The control socket, `daxd inspect` and `daxd resize`: the protocol, the server on the
//! daemon's event loop, the client, and the two renderings of an inspection (tables and
//! Prometheus text).
//!
//! Protocol: a client connects and writes one [`protocol::Request`] as a JSON line; daxd
//! answers with one JSON document (a [`protocol::Inspection`], or the outcome of a
//! request) and closes. A client that sends nothing within a second, or closes its side,
//! gets an inspection, so a stuck or hostile client holds the event loop for at most the
//! read and write timeouts.

mod client;
mod prometheus;
mod protocol;
mod server;
mod tables;

pub use client::{fault_add, fault_clear, fault_list, inspect, mark, resize, Format};
pub use protocol::ResizeRefused;
pub use server::ControlSocket;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use daxd_blk::BlkDevice;
    use daxd_region::{Layout, Region, Serve};
    use daxd_registry::{FrameRange, Registry};

    use super::client::fetch;
    use super::prometheus::prometheus;
    use super::protocol::{Inspection, ServeKind};
    use super::tables::tables;
    use super::*;
    use daxd_registry::{MappingRequest, Target};

    #[test]
    fn an_inspection_crosses_the_socket_unchanged_and_renders() {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(
            Region::open(&daxd_region::RegionConfig::new(
                dir.path().join("r.img"),
                Some(8 << 20),
            ))
            .unwrap(),
        );
        let layout = Arc::new(
            Layout::new(
                region.size(),
                vec![
                    daxd_region::Window {
                        name: "disk".into(),
                        offset: 0,
                        size: 4 << 20,
                        serve: Serve::Blk,
                    },
                    daxd_region::Window {
                        name: "pm0".into(),
                        offset: 4 << 20,
                        size: 4 << 20,
                        serve: Serve::Pmem,
                    },
                ],
                false,
            )
            .unwrap(),
        );
        let registry = Arc::new(Registry::new(region.frames()));
        let owner = registry.new_owner("connection 1");
        registry
            .map(
                owner,
                MappingRequest {
                    device: "virtio-pmem".into(),
                    target: Target::SharedMemory {
                        shmid: 0,
                        offset: 0,
                    },
                    frames: FrameRange::covering(4 << 20, 4 << 20),
                    writable: true,
                },
            )
            .unwrap();
        let blk = Arc::new(
            BlkDevice::new(
                region.clone(),
                registry.clone(),
                layout.blk().unwrap(),
                daxd_blk::BlkConfig {
                    num_queues: 2,
                    queue_size: 128,
                    read_only: false,
                    sync: false,
                    serial: daxd_blk::Serial::new("control-test").unwrap(),
                },
            )
            .unwrap(),
        );
        let path = dir.path().join("control.sock");
        let mut socket = ControlSocket::bind(
            &path,
            0o600,
            region.clone(),
            Arc::new(arc_swap::ArcSwap::new(layout.clone())),
            registry.clone(),
            blk.clone(),
            Default::default(),
        )
        .unwrap();
        let expected = Inspection::of(&region, &layout, &registry, &blk);
        let server = std::thread::spawn(move || {
            let (stream, _) = loop {
                match socket.listener.accept() {
                    Ok(accepted) => break accepted,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            socket.answer(stream);
        });
        let fetched = fetch(&path).unwrap();
        server.join().unwrap();
        assert_eq!(fetched, expected);
        assert_eq!(fetched.registry.descriptors, 1024);
        assert_eq!(fetched.windows[1].serve, ServeKind::Pmem);
        let text = tables(&fetched);
        assert!(text.contains("shm 0 +0x0"), "{text}");
        assert!(
            text.contains("pm0          0x400000      0x400000      pmem"),
            "{text}"
        );
        assert!(text.contains("descriptors: 1024 (16384 bytes)"), "{text}");
        assert_eq!(fetched.blk.queues.len(), 2);
        assert!(text.contains("region flushes: 0"), "{text}");

        // Every Prometheus line is a comment or `name{labels} value`, every family is
        // declared before its samples, and histograms end in +Inf, _sum and _count.
        let exposition = prometheus(&fetched);
        let mut declared = std::collections::HashSet::new();
        for line in exposition.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| declared.contains(*f))
                .unwrap_or(name);
            assert!(declared.contains(family), "undeclared: {line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
        }
        assert!(
            exposition.contains("daxd_blk_flush_latency_seconds_bucket{queue=\"1\",le=\"+Inf\"} 0")
        );
        assert!(exposition.contains("daxd_blk_requests_total{queue=\"0\",type=\"read\"} 0"));
    }
}
