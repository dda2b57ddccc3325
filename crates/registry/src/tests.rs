use proptest::prelude::*;

use super::*;
use crate::flush::{epoch_le, next_epoch};
use std::sync::atomic::AtomicBool;

fn fr(start: u64, end: u64) -> FrameRange {
    FrameRange { start, end }
}

fn req(frames: FrameRange, writable: bool) -> MappingRequest {
    MappingRequest {
        device: "test".into(),
        target: Target::GuestPhysical {
            gpa: frames.start << 12,
        },
        frames,
        writable,
    }
}

#[test]
fn descriptors_exist_only_while_mapped() {
    let r = Registry::new(100);
    let o = r.new_owner("conn");
    assert!(r.descriptor(10).is_none());
    assert!(!r.is_visible(fr(0, 100)));
    let id = r.map(o, req(fr(10, 20), true)).unwrap();
    assert!(r.is_visible(fr(19, 30)));
    assert!(!r.is_visible(fr(20, 30)));
    let d = r.descriptor(15).unwrap();
    assert_eq!((d.map_count, d.pin_count, d.dirty_epoch), (1, 0, 0));
    assert_ne!(d.state & PageDescriptor::WRITABLE, 0);
    assert!(r.descriptor(20).is_none());
    assert_eq!(r.snapshot().descriptors, 10);
    // Descriptors come in chunks of 512 (2 MiB of region, 8 KiB of descriptors).
    assert_eq!(r.snapshot().descriptor_bytes, 512 * 16);
    r.unmap(id).unwrap();
    assert!(r.descriptor(15).is_none());
    assert_eq!(r.snapshot().descriptors, 0);
    assert!(!r.is_visible(fr(0, 100)));
}

#[test]
fn aliases_share_one_descriptor_and_its_reverse_map() {
    let r = Registry::new(100);
    let o = r.new_owner("conn");
    let a = r.map(o, req(fr(0, 50), false)).unwrap();
    let b = r.map(o, req(fr(40, 60), true)).unwrap();
    assert_eq!(
        r.snapshot().descriptors,
        60,
        "aliased pages must not get a second descriptor"
    );
    assert_eq!(r.descriptor(45).unwrap().map_count, 2);
    assert_eq!(r.rmap(45), vec![a, b]);
    assert_eq!(r.rmap(10), vec![a]);
    assert_eq!(r.rmap(55), vec![b]);
    assert_eq!(
        r.descriptor(10).unwrap().state & PageDescriptor::WRITABLE,
        0
    );
    assert_ne!(
        r.descriptor(45).unwrap().state & PageDescriptor::WRITABLE,
        0
    );
    r.unmap(b).unwrap();
    assert_eq!(r.descriptor(45).unwrap().map_count, 1);
    assert_eq!(
        r.descriptor(45).unwrap().state & PageDescriptor::WRITABLE,
        0
    );
    assert_eq!(r.rmap(45), vec![a]);
    assert!(r.descriptor(55).is_none());
    r.unmap(a).unwrap();
    assert_eq!(
        r.inner.lock().unwrap().rmap.live_sets(),
        1,
        "only the empty set is left"
    );
}

#[test]
fn no_hole_is_punched_while_mapped_or_pinned() {
    let r = Registry::new(100);
    let o = r.new_owner("conn");
    let id = r.map(o, req(fr(10, 20), true)).unwrap();
    let err = r.begin_layout_change(fr(15, 30), "discard").unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Busy {
                mapped: 5,
                pinned: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(r.begin_layout_change(fr(20, 30), "discard").is_ok());

    let mut pin = r.pins(PinSet::default());
    pin.pin(fr(18, 25));
    assert_eq!(
        pin.frames().collect::<Vec<_>>(),
        [fr(18, 20)],
        "only visible frames are pinned"
    );
    r.unmap(id).unwrap();
    // The mapping is gone but an in-flight request still pins two pages.
    assert_eq!(r.snapshot().descriptors, 2);
    let err = r.begin_layout_change(fr(0, 100), "discard").unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Busy {
                mapped: 0,
                pinned: 2,
                ..
            }
        ),
        "{err}"
    );
    drop(pin);
    assert_eq!(r.snapshot().descriptors, 0);
    assert!(r.begin_layout_change(fr(0, 100), "discard").is_ok());
}

#[test]
fn maps_wait_for_a_layout_change_to_finish() {
    let r = std::sync::Arc::new(Registry::new(100));
    let o = r.new_owner("conn");
    let change = r.begin_layout_change(fr(0, 10), "discard").unwrap();
    assert_eq!(r.snapshot().busy.len(), 1);
    let r2 = r.clone();
    let mapper = std::thread::spawn(move || r2.map(o, req(fr(5, 15), true)).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        r.descriptor(5).is_none(),
        "mapped while the layout change was running"
    );
    drop(change);
    mapper.join().unwrap();
    assert_eq!(r.descriptor(5).unwrap().map_count, 1);
    assert!(r.snapshot().busy.is_empty());
}

#[test]
fn a_failed_map_changes_nothing() {
    let r = Registry::new(100);
    let o = r.new_owner("conn");
    r.map(o, req(fr(0, 10), true)).unwrap();
    let before = format!("{:?}", r.snapshot());
    assert!(matches!(
        r.map(o, req(fr(90, 101), true)),
        Err(RegistryError::OutOfRange(..))
    ));
    assert!(matches!(
        r.map(o, req(fr(5, 5), true)),
        Err(RegistryError::OutOfRange(..))
    ));
    r.slots[0].load_full().unwrap().descs[3]
        .map_count
        .store(u16::MAX, Ordering::Relaxed);
    let saturated = format!("{:?}", r.snapshot());
    assert!(matches!(
        r.map(o, req(fr(2, 20), true)),
        Err(RegistryError::TooManyMappings(..))
    ));
    assert_eq!(format!("{:?}", r.snapshot()), saturated);
    assert_ne!(before, saturated);
    assert!(r.descriptor(15).is_none());
}

#[test]
fn releasing_an_owner_leaves_no_descriptor() {
    let r = Registry::new(1000);
    let conn = r.new_owner("connection 1");
    let other = r.new_owner("connection 2");
    r.map(conn, req(fr(0, 100), true)).unwrap();
    r.map(conn, req(fr(50, 150), false)).unwrap();
    let keep = r.map(other, req(fr(500, 510), true)).unwrap();
    r.release_owner(conn);
    let snap = r.snapshot();
    assert_eq!(snap.descriptors, 10);
    assert_eq!(snap.mappings.len(), 1);
    assert_eq!(snap.mappings[0].id, keep);
    assert_eq!(snap.mappings[0].owner, "connection 2");
    r.release_owner(other);
    assert_eq!(r.snapshot().descriptors, 0);
}

#[test]
fn flush_epochs_only_increase_and_clean_what_came_before() {
    let r = Registry::new(100);
    let o = r.new_owner("conn");
    r.map(o, req(fr(0, 10), true)).unwrap();
    r.mark_dirty(fr(0, 2));
    let first = r.descriptor(0).unwrap().dirty_epoch;
    assert_ne!(first, 0);
    let ticket = r.flush_begin();
    r.mark_dirty(fr(5, 6)); // written while the flush runs: not covered by it
    r.flush_complete(ticket);
    assert_eq!(r.descriptor(0).unwrap().dirty_epoch, 0);
    assert_ne!(r.descriptor(5).unwrap().dirty_epoch, 0);
    let snap = r.snapshot();
    assert_eq!(snap.last_flushed, first);
    assert!(epoch_le(snap.last_flushed, snap.epoch) && snap.last_flushed != snap.epoch);
    // An older flush completing late does not move the epoch back.
    let older = r.flush_begin();
    let newer = r.flush_begin();
    r.flush_complete(newer);
    r.flush_complete(older);
    assert_eq!(r.snapshot().last_flushed, newer.0);
    assert_eq!(r.descriptor(5).unwrap().dirty_epoch, 0);
}

#[test]
fn epochs_survive_wrapping() {
    assert!(epoch_le(u32::MAX, 1));
    assert!(!epoch_le(1, u32::MAX));
    assert_eq!(next_epoch(u32::MAX), 1);
}

#[test]
fn lock_free_pins_and_marks_race_maps_and_unmaps_without_losing_count() {
    // Two workers pin, mark and unpin frames of two chunks while a third thread maps and
    // unmaps them over and over: every pin must be released into the chunk it was taken
    // from, and once everything is gone no descriptor and no chunk may be left.
    let r = std::sync::Arc::new(Registry::new(4 * CHUNK_FRAMES));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut set = PinSet::default();
                let mut pinned = 0u64;
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let start = (i * 37) % (2 * CHUNK_FRAMES);
                    let frames = fr(start, start + 8);
                    let mut pins = r.pins(&mut set);
                    pins.pin(frames);
                    pinned += pins.frames().map(|f| f.len()).sum::<u64>();
                    r.mark_dirty(frames);
                    drop(pins);
                    i += 1;
                }
                pinned
            })
        })
        .collect();
    let o = r.new_owner("racer");
    for round in 0..2000u64 {
        let first = r.map(o, req(fr(0, CHUNK_FRAMES + 64), true)).unwrap();
        let second = r
            .map(o, req(fr(64 + round % 64, 2 * CHUNK_FRAMES), false))
            .unwrap();
        if round % 7 == 0 {
            let ticket = r.flush_begin();
            r.flush_complete(ticket);
        }
        r.unmap(first).unwrap();
        r.unmap(second).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let pinned: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(pinned > 0, "the workers never found anything mapped");
    let snap = r.snapshot();
    assert_eq!(snap.descriptors, 0, "{snap:?}");
    assert_eq!(
        snap.descriptor_bytes, 0,
        "a chunk outlived its mappings and pins"
    );
    assert!(r.slots.iter().all(|s| s.load().is_none()));
}

/// Operations for the model test; indices are taken modulo what exists.
#[derive(Debug, Clone)]
enum Op {
    Map {
        start: u64,
        len: u64,
        writable: bool,
    },
    Unmap(usize),
    Pin {
        start: u64,
        len: u64,
    },
    Unpin(usize),
    Discard {
        start: u64,
        len: u64,
    },
    Write {
        start: u64,
        len: u64,
    },
    Flush,
    Release,
}

const FRAMES: u64 = 48;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..FRAMES, 1..16u64);
    prop_oneof![
        4 => (range.clone(), any::<bool>()).prop_map(|((start, len), writable)| Op::Map { start, len, writable }),
        3 => any::<usize>().prop_map(Op::Unmap),
        3 => range.clone().prop_map(|(start, len)| Op::Pin { start, len }),
        3 => any::<usize>().prop_map(Op::Unpin),
        3 => range.clone().prop_map(|(start, len)| Op::Discard { start, len }),
        2 => range.prop_map(|(start, len)| Op::Write { start, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn registry_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..60)) {
        let r = Registry::new(FRAMES);
        let mut owner = r.new_owner("model");
        // The model: live mappings, live pins (as pinned ranges), dirty frames.
        let mut maps: Vec<(MappingId, FrameRange, bool)> = Vec::new();
        let mut pins: Vec<Pins<'_, PinSet>> = Vec::new();
        let mut dirty = [false; FRAMES as usize];
        let mut last_epoch = r.snapshot().epoch;
        let mut last_flushed = 0u32;
        for op in ops {
            match op {
                Op::Map { start, len, writable } => {
                    let frames = fr(start, (start + len).min(FRAMES));
                    let id = r.map(owner, req(frames, writable)).unwrap();
                    maps.push((id, frames, writable));
                }
                Op::Unmap(i) if !maps.is_empty() => {
                    let (id, ..) = maps.remove(i % maps.len());
                    r.unmap(id).unwrap();
                }
                Op::Pin { start, len } => {
                    let frames = fr(start, (start + len).min(FRAMES));
                    let mut pin = r.pins(PinSet::default());
                    pin.pin(frames);
                    let pinned: u64 = pin.frames().map(|p| p.len()).sum();
                    let visible = (frames.start..frames.end)
                        .filter(|f| maps.iter().any(|(_, m, _)| m.contains(*f)) || pins.iter().any(|p| p.frames().any(|q| q.contains(*f))))
                        .count() as u64;
                    prop_assert_eq!(pinned, visible, "pins exactly the frames with descriptors");
                    pins.push(pin);
                }
                Op::Unpin(i) if !pins.is_empty() => {
                    drop(pins.remove(i % pins.len()));
                }
                Op::Discard { start, len } => {
                    let frames = fr(start, (start + len).min(FRAMES));
                    let in_use = (frames.start..frames.end).any(|f| {
                        maps.iter().any(|(_, m, _)| m.contains(f))
                            || pins.iter().any(|p| p.frames().any(|q| q.contains(f)))
                    });
                    let result = r.begin_layout_change(frames, "discard");
                    prop_assert_eq!(result.is_ok(), !in_use, "discard of {:?} allowed iff nothing there is mapped or pinned", frames);
                }
                Op::Write { start, len } => {
                    let frames = fr(start, (start + len).min(FRAMES));
                    r.mark_dirty(frames);
                    for f in frames.start..frames.end {
                        if r.descriptor(f).is_some() {
                            dirty[f as usize] = true;
                        }
                    }
                }
                Op::Flush => {
                    let ticket = r.flush_begin();
                    r.flush_complete(ticket);
                    dirty = [false; FRAMES as usize];
                    let snap = r.snapshot();
                    prop_assert!(epoch_le(last_flushed, snap.last_flushed) && snap.last_flushed != last_flushed || last_flushed == 0);
                    last_flushed = snap.last_flushed;
                }
                Op::Release => {
                    r.release_owner(owner);
                    maps.clear();
                    owner = r.new_owner("model");
                }
                _ => {}
            }
            let snap = r.snapshot();
            prop_assert!(epoch_le(last_epoch, snap.epoch), "epoch went back");
            last_epoch = snap.epoch;
            let mut expected_descriptors = 0;
            for f in 0..FRAMES {
                let mut covering: Vec<MappingId> = maps.iter().filter(|(_, m, _)| m.contains(f)).map(|(id, ..)| *id).collect();
                covering.sort();
                let pinned = pins.iter().filter(|p| p.frames().any(|q| q.contains(f))).count() as u32;
                let writable = maps.iter().any(|(_, m, w)| *w && m.contains(f));
                match r.descriptor(f) {
                    Some(d) => {
                        expected_descriptors += 1;
                        prop_assert!(!covering.is_empty() || pinned > 0, "frame {} has a descriptor but is neither mapped nor pinned", f);
                        prop_assert_eq!(usize::from(d.map_count), covering.len(), "map count of frame {}", f);
                        prop_assert_eq!(d.pin_count, pinned, "pin count of frame {}", f);
                        prop_assert_eq!(d.state & PageDescriptor::WRITABLE != 0, writable, "writable bit of frame {}", f);
                        prop_assert_eq!(d.dirty_epoch != 0, dirty[f as usize], "dirty state of frame {}", f);
                        prop_assert_eq!(r.rmap(f), covering, "reverse map of frame {}", f);
                    }
                    None => {
                        prop_assert!(covering.is_empty() && pinned == 0, "frame {} lost its descriptor", f);
                        dirty[f as usize] = false;
                    }
                }
            }
            prop_assert_eq!(snap.descriptors, expected_descriptors);
            let dirty_count = (0..FRAMES).filter(|f| r.descriptor(*f).is_some_and(|d| d.dirty_epoch != 0)).count() as u64;
            let counted: u64 = r.slots.iter().filter_map(|s| s.load_full()).map(|c| {
                c.descs.iter().filter(|d| d.exists() && d.dirty_epoch.load(Ordering::Relaxed) != 0).count() as u64
            }).sum();
            let counters: u64 = r.slots.iter().filter_map(|s| s.load_full()).map(|c| c.dirty.load(Ordering::Relaxed)).sum();
            prop_assert_eq!(counted, dirty_count, "dirty descriptors");
            prop_assert!(counters >= counted, "a chunk's dirty counter misses dirty pages");
            let chunks = r.slots.iter().filter(|s| s.load().is_some()).count() as u64;
            prop_assert_eq!(chunks * 512 * 16, snap.descriptor_bytes);
            prop_assert_eq!(chunks == 0, expected_descriptors == 0, "chunks exist iff descriptors do");
        }
        drop(pins);
        r.release_owner(owner);
        prop_assert_eq!(r.snapshot().descriptors, 0, "descriptors left after everything went");
        prop_assert_eq!(r.inner.lock().unwrap().rmap.live_sets(), 1, "reverse-map sets leaked");
    }
}
