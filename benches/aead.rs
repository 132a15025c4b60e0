//! Single-core throughput of sealing and opening tenant data, the cost
//! encryption at rest adds to every PUT and GET (README, "Performance").
//! Run: `cargo bench --bench aead`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lumbung::crypto::{open, seal, Key, Purpose};

fn aead(c: &mut Criterion) {
    let key = Key::random();
    let mut group = c.benchmark_group("aead");
    // A full chunk, and a small object's inline body.
    for size in [4 * 1024 * 1024, 4 * 1024] {
        let plain = vec![0x5au8; size];
        let sealed = seal(&key, 1, Purpose::Chunk, b"tenant", &plain);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", size), &plain, |b, p| {
            b.iter(|| seal(&key, 1, Purpose::Chunk, b"tenant", p))
        });
        group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, s| {
            b.iter(|| open(&key, Purpose::Chunk, b"tenant", s).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
