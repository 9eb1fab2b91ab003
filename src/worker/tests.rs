//! Unit tests of the per-core state: request ids, breaker reports and reused slots, and how a
//! new backend table is taken in.

use super::*;
use crate::backends::desired;

use crate::worker::testing::*;

#[test]
fn request_ids_are_the_prefix_then_the_count_in_hex() {
    for (r, core) in [
        (0u64, 0usize),
        (u64::MAX, 3),
        (0x0123_4567_89ab_cdef, 0x1_2345),
    ] {
        let p = request_id_prefix(r, core);
        assert_eq!(&p[..], format!("{r:016x}{:04x}", core & 0xffff).as_bytes());
    }
    let cfg = testing::config(&["http://127.0.0.1:1"]);
    let (w, _inbox, _plane) = testing::worker(testing::registry(&cfg, 2).publish(cfg.clone()));
    let prefix = w.id_prefix.to_string();
    assert_eq!(prefix.len(), 20);
    assert_eq!(w.next_request_id(), format!("{prefix}00000001"));
    w.seq.set(0xffff_fffe);
    assert_eq!(w.next_request_id(), format!("{prefix}ffffffff"));
    assert_eq!(w.next_request_id(), format!("{prefix}100000000"));
}

#[test]
fn breaker_trips_are_reported_and_a_reused_slot_starts_closed() {
    use crate::worker::breaker::{Phase, Report};
    let cfg = config(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    let mut reg = registry(&cfg, 2);
    let (w, inbox, _plane, health) = worker_and_health(reg.publish(cfg.clone()));
    let id = w.view.id(0);
    for _ in 0..cfg.breaker.consecutive_failures - 1 {
        w.outcome(0, Verdict::Fault);
    }
    assert!(health.try_recv().is_err());
    assert!(w.eligible(0));
    w.outcome(0, Verdict::Fault);
    match health.try_recv() {
        Ok(HealthReport::Breaker {
            backend: 0,
            id: got,
            report: Report::Trip,
        }) => assert_eq!(got, id),
        _ => panic!("no trip reported"),
    }
    // Cut off on this core at once; health is untouched.
    assert!(!w.eligible(0) && w.view.is_up(0) && w.eligible(1));
    let open_slot0 = |id| {
        let phase = Phase::Open;
        inbox
            .send(ControlMsg::Breaker {
                backend: 0,
                id,
                phase,
            })
            .unwrap();
        w.drain_inbox();
    };
    open_slot0(id);
    assert_eq!(w.breakers.phase(0).as_str(), "open");

    // Backend 1 leaves, drains on both cores; backend 3 takes its slot under a new id.
    let cfg2 = config(&["http://127.0.0.1:2", "http://127.0.0.1:3"]);
    let urls = ["http://127.0.0.1:2", "http://127.0.0.1:3"];
    reg.apply(desired(&cfg2, &statics(&urls[..1]), &Default::default()));
    let v = reg.version();
    assert!(!reg.drained(0, id, v) && reg.drained(1, id, v));
    reg.apply(desired(&cfg2, &statics(&urls), &Default::default()));
    inbox
        .send(ControlMsg::Table(reg.publish(cfg2.clone())))
        .unwrap();
    w.drain_inbox();
    assert_ne!(w.view.id(0), id);
    assert_eq!(w.breakers.phase(0).as_str(), "closed");
    // A late message about the departed backend changes nothing.
    open_slot0(id);
    assert!(w.eligible(0));
}

#[test]
fn a_new_table_keeps_what_stays_and_resets_what_changed() {
    let cfg = config(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    let mut reg = registry(&cfg, 2);
    let (w, inbox, plane) = worker(reg.publish(cfg.clone()));
    let guard = w.begin(1);
    inbox
        .send(ControlMsg::Load {
            core: 1,
            backend: 0,
            id: w.view.id(0),
            in_flight: 3,
        })
        .unwrap();
    w.drain_inbox();
    assert_eq!((w.view.load(0), w.view.load(1)), (3, 1));

    // Backend 2 is removed (it still holds a request here), backend 3 added.
    let cfg2 = config(&["http://127.0.0.1:1", "http://127.0.0.1:3"]);
    let statics = [
        (
            "http://127.0.0.1:1".to_string(),
            "127.0.0.1:1".parse().unwrap(),
        ),
        (
            "http://127.0.0.1:3".to_string(),
            "127.0.0.1:3".parse().unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    reg.apply(desired(&cfg2, &statics, &Default::default()));
    inbox
        .send(ControlMsg::Table(reg.publish(cfg2.clone())))
        .unwrap();
    w.drain_inbox();
    let t = w.table();
    assert!(Arc::ptr_eq(&w.config(), &cfg2));
    assert_eq!(t.get(1).unwrap().state, State::Draining);
    assert_eq!(t.get(2).unwrap().spec.url, "http://127.0.0.1:3");
    // Kept: counts and health. Draining: its own request still counted, no new picks.
    assert_eq!((w.view.load(0), w.view.load(1), w.view.load(2)), (3, 1, 0));
    assert!(w.view.is_up(0) && w.view.is_up(2));
    let mask = t.routes.backends_for(None).unwrap();
    assert_eq!(mask, &[true, false, true]);

    // Nothing reported while the request runs; once it ends the tick reports the drain.
    w.tick();
    assert!(plane.try_recv().is_err());
    drop(guard);
    w.tick();
    match plane.try_recv() {
        Ok(PlaneMsg::Drained { core: 0, id, .. }) => assert_eq!(id, t.get(1).unwrap().id),
        _ => panic!("no drain report"),
    }
    w.tick();
    assert!(plane.try_recv().is_err(), "reported twice");
}
