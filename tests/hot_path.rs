//! The per-call work that must not allocate: recording a call's metrics once a thread has
//! recorded the same series before (see `src/telemetry.rs`, and BENCHMARKS.md "hot path").
//! Counted by a global allocator that counts this thread's allocations only, so the test
//! harness's other threads do not disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: System's allocator, with a thread-local counter beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// What a Reserve records: its call's latency, its decision (a tier named at run time), and
/// its counters.
fn record_one_reserve(tier: &str) {
    use tollgate::telemetry as m;
    m::rpc("Reserve", tonic::Code::Ok, Instant::now());
    m::decision(tier, "ALLOWED", "");
    m::add(m::SAVED, 3);
    m::add(m::TOKENS_HELD, 200);
}

#[test]
fn recording_a_calls_metrics_allocates_nothing_once_its_series_exist() {
    let handle = tollgate::telemetry::install_recorder().expect("install the recorder");
    let tier = String::from("pro");
    // The first record of each series registers it (that allocates).
    record_one_reserve(&tier);
    let before = allocations();
    for _ in 0..100 {
        record_one_reserve(&tier);
    }
    let per_call = (allocations() - before) as f64 / 100.0;
    // The histogram's buckets grow in blocks now and then; anything per call is a label or a
    // key built again.
    assert!(
        per_call < 0.5,
        "{per_call} allocations per recorded Reserve"
    );
    // And what was recorded is all there.
    let text = handle.render();
    assert!(
        text.contains(
            r#"tollgate_decisions_total{tier="pro",decision="ALLOWED",denied_by=""} 101"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"tollgate_rpc_duration_seconds_count{method="Reserve",code="OK"} 101"#),
        "{text}"
    );
    assert!(text.contains("tollgate_tokens_held_total 20200"), "{text}");
}
