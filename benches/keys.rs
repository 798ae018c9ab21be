//! Canonical key building (arguments → RFC 8785 JSON → md5 hex) for typical argument shapes.
//!     cargo bench --bench keys

use std::{collections::BTreeMap, hint::black_box};

use criterion::{Criterion, criterion_group, criterion_main};
use serde::Serialize;

#[derive(Serialize)]
struct Query {
    customer_id: u64,
    status: &'static str,
    page: u32,
    include_archived: bool,
}

fn keys(c: &mut Criterion) {
    c.bench_function("digest (3, 4)", |b| {
        b.iter(|| cache_money::canonical::digest(black_box(&(3, 4))).unwrap())
    });
    c.bench_function("digest (user id, locale)", |b| {
        b.iter(|| cache_money::canonical::digest(black_box(&(918_273_u64, "en-GB"))).unwrap())
    });
    let query = Query {
        customer_id: 42,
        status: "open",
        page: 3,
        include_archived: false,
    };
    c.bench_function("digest (struct of 4 fields,)", |b| {
        b.iter(|| cache_money::canonical::digest(black_box(&(&query,))).unwrap())
    });
    let filters: BTreeMap<String, Vec<f64>> = (0..8)
        .map(|i| (format!("filter_{i}"), vec![i as f64 * 0.5, 1e-7, 12.25]))
        .collect();
    c.bench_function("digest (map of 8 float lists,)", |b| {
        b.iter(|| cache_money::canonical::digest(black_box(&(&filters,))).unwrap())
    });
}

criterion_group!(benches, keys);
criterion_main!(benches);
