//! In-flight recovery on any area a frontend could hand over (the bytes of a previous
//! backend's tracking, or garbage): never a panic; what is resubmitted is a set of distinct
//! heads inside the queue, the ring resumes after exactly those, and once they are
//! completed a second recovery finds nothing left.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::VhostUserInflight;

use daxd_vhost_user::inflight::{self, InflightArea, Recovery};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let queue_size = u16::from_le_bytes([data[0], data[1]]) % 256 + 1;
    let used = u16::from_le_bytes([data[2], data[3]]);
    let request = VhostUserInflight::new(0, 0, 1, queue_size);
    let (reply, file) = inflight::create(&request, 1, 256).unwrap();
    let bytes = &data[4..];
    let len = bytes.len().min(reply.mmap_size as usize);
    rustix::io::pwrite(&file, &bytes[..len], 0).unwrap();
    let area = InflightArea::map(&reply, file, 1, 256).unwrap();
    if let Recovery::Resume {
        next_avail,
        resubmit,
    } = area.recover(0, used)
    {
        assert!(resubmit.len() <= usize::from(queue_size));
        assert!(resubmit.iter().all(|&h| h < queue_size));
        assert_eq!(
            resubmit.iter().collect::<HashSet<_>>().len(),
            resubmit.len()
        );
        assert_eq!(next_avail, used.wrapping_add(resubmit.len() as u16));
        let mut idx = used;
        for &head in &resubmit {
            idx = idx.wrapping_add(1);
            area.publishing(0, head);
            area.published(0, head, idx);
        }
        assert_eq!(
            area.recover(0, idx),
            Recovery::Resume {
                next_avail: idx,
                resubmit: Vec::new()
            }
        );
    }
});
