//! credlet-signer-bench: how fast the PodCertificateRequest signer answers,
//! against the in-process fake API server over HTTP with the real kube
//! client (loopback only):
//!
//! ```sh
//! cargo bench -p credlet-signer --bench credlet-signer-bench
//! CREDLET_BENCH_N=500 cargo bench -p credlet-signer --bench credlet-signer-bench
//! ```
//!
//! N requests (default 2,000, P-256 keys with real proofs of possession,
//! each for its own pod and service account on one node) are created as
//! fast as the API server takes them (16 concurrent creates) while the
//! signer runs (leader elected, `CREDLET_BENCH_WORKERS` workers, default
//! 8). A watch on the requests notes when each one shows `Issued`. Printed:
//! requests issued per second (first create to last `Issued`), p50/p99 of
//! create-to-`Issued`, and the rate next to the crypto floor of DESIGN.md
//! §6 (one pod certificate ≈ 125 µs, ~8,000/s on one core). Each request
//! costs the signer a proof verification, three identity GETs, a signing
//! and a status write, all against a fake API server that shares the
//! machine's two cores.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credlet_signer::SignerMetrics;
use credlet_signer::request::{ApiVersion, PodCertificateRequest};
use kube::api::PostParams;
use kube::runtime::watcher;
use support::{Cluster, KeyKind, condition};
use tokio_stream::StreamExt;

/// DESIGN.md §6: one pod certificate (keygen + sign + PEMs + write).
const POD_CERTIFICATE_FLOOR_US: f64 = 125.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let n = env_usize("CREDLET_BENCH_N", 2000);
    let workers = env_usize("CREDLET_BENCH_WORKERS", 8);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(n, workers))
}

async fn run(n: usize, workers: usize) -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    println!("credlet-signer-bench: {n} requests, P-256, {workers} signer workers");
    // Pods, service accounts, keys and proofs first: not part of the
    // signer's work.
    let prepared_at = Instant::now();
    let mut requests = Vec::with_capacity(n);
    for i in 0..n {
        let request = cluster.pod_with_request("bench", &format!("p{i}"), KeyKind::P256)?;
        requests.push(request.json());
    }
    println!(
        "  prepared {n} pods, service accounts and requests in {:.2?}",
        prepared_at.elapsed()
    );

    let mut settings = cluster.settings("bench-0");
    settings.signer.workers = workers;
    let signer = cluster.start(settings, SignerMetrics::default()).await?;
    let mut leadership = signer.leadership();
    leadership.wait_leading().await;

    let client = cluster.server.kube_client()?;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let issued: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let api: kube::Api<PodCertificateRequest> =
            kube::Api::namespaced_with(client.clone(), "bench", &ApiVersion::V1beta1);
        let issued = Arc::clone(&issued);
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                let seen = Instant::now();
                let request = match event {
                    Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r)) => r,
                    _ => continue,
                };
                let Ok(value) = serde_json::to_value(&request) else {
                    continue;
                };
                if condition(&value).is_some_and(|(t, _)| t == "Issued")
                    && let Some(name) = request.metadata.name
                {
                    issued
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(name)
                        .or_insert(seen);
                }
            }
        })
    };

    let api: kube::Api<PodCertificateRequest> =
        kube::Api::namespaced_with(client, "bench", &ApiVersion::V1beta1);
    let started = Instant::now();
    let queue = Arc::new(Mutex::new(requests));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let api = api.clone();
        let queue = Arc::clone(&queue);
        let created = Arc::clone(&created);
        creators.spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(json) = next else {
                    return Ok::<_, anyhow::Error>(());
                };
                let request: PodCertificateRequest = serde_json::from_value(json)?;
                let name = request.metadata.name.clone().unwrap_or_default();
                let sent = Instant::now();
                api.create(&PostParams::default(), &request).await?;
                created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name, sent);
            }
        });
    }
    while let Some(result) = creators.join_next().await {
        result??;
    }
    let create_time = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 20);
    loop {
        let done = issued.lock().unwrap_or_else(|e| e.into_inner()).len();
        if done >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {n} requests issued before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watch.abort();
    signer.shutdown().await?;

    let created = created.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let issued = issued.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = issued.values().max().copied().unwrap_or(started);
    let total = last.duration_since(started);
    let mut latencies: Vec<Duration> = issued
        .iter()
        .filter_map(|(name, at)| created.get(name).map(|c| at.saturating_duration_since(*c)))
        .collect();
    latencies.sort();
    let rate = n as f64 / total.as_secs_f64();
    let floor_rate = 1e6 / POD_CERTIFICATE_FLOOR_US;
    println!(
        "  created {n} requests in {create_time:.2?} ({:.0}/s)",
        n as f64 / create_time.as_secs_f64()
    );
    println!("  issued {n} in {total:.2?}: {rate:.0} requests/s");
    println!(
        "  create → Issued: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "  vs floor (DESIGN.md §6, one pod certificate {POD_CERTIFICATE_FLOOR_US} µs ≈ {floor_rate:.0}/s/core): {:.3} of the floor rate, {:.0} µs per request",
        rate / floor_rate,
        1e6 / rate
    );
    Ok(())
}
