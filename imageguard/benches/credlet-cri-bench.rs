//! credlet-cri-bench: what credlet's CRI proxy costs, against a real
//! containerd and a real registry (needs root and the packages of
//! `test-util/install-deps.sh`):
//!
//! ```sh
//! cargo bench -p credlet-imageguard --bench credlet-cri-bench
//! CREDLET_BENCH_N=20000 cargo bench -p credlet-imageguard --bench credlet-cri-bench
//! ```
//!
//! `CREDLET_BENCH_STATE_DIR` puts the records elsewhere (e.g. `/dev/shm`),
//! `CREDLET_BENCH_PROXY_THREADS` sizes the proxy's runtime (default 1, as
//! the agent's `CREDLET_WORKER_THREADS`).
//!
//! 1. Added latency on pass-through unary calls (`Version`, `ListImages`):
//!    N sequential calls straight to containerd and through the proxy,
//!    interleaved in rounds; p50/p99 of each and the difference (goal: p50
//!    added ≤ 50 µs), next to what a plain byte relay (no HTTP/2, no
//!    inspection: the floor of any proxy) adds.
//! 2. Verifying a cached image for a new pod: `PullImage` through credlet
//!    (one manifest HEAD, nothing downloaded) vs containerd re-pulling the
//!    cached image with the same credentials (what the kubelet's KEP-2535
//!    check triggers without credlet): median wall time of 20 and registry
//!    requests per operation (goal: ≤ 1/5 of the time).
//! 3. The cached decision: `PullImage` through credlet for a credential
//!    verified within the TTL (no registry request), by the pods of a full
//!    node (110) in turn, vs the same upstream `ImageStatus` through a
//!    pass-through proxy; and the decision measured in process (decode,
//!    parse, HMAC, record lookup, policy; and the record write that follows,
//!    behind the answer, a `PullImage` that writes a grant, with 110 and
//!    2,200 grants in the record: one small file each, whatever the count).
//!
//! The proxy runs on its own one-thread runtime (as in the agent), the
//! client on a single-thread runtime (as a separate kubelet process would).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use credlet_imageguard::credential::Credential;
use credlet_imageguard::events::NoEvents;
use credlet_imageguard::pods::StaticPodIndex;
use credlet_imageguard::policy::{GuardPolicy, Provenance};
use credlet_imageguard::proxy::PassThrough;
use credlet_imageguard::records::{Grant, RecordStore, unix};
use credlet_imageguard::reference::ImageRef;
use credlet_test_util::cri::v1::{ImageStatusRequest, ListImagesRequest, VersionRequest};
use credlet_test_util::{Containerd, Registry, build_and_push_image};
use prost::Message;
use support::{Kubelet, Proxy, TestPod, auth, guard, open_records, spec, traffic, verifier};

const ALICE: (&str, &str) = ("alice", "alice-secret");
const VERIFY_RUNS: usize = 20;
/// Pods per node (the kubelet's default `maxPods`).
const NODE_PODS: usize = 110;
const ADDED_P50_GOAL_US: f64 = 50.0;
const VERIFY_RATIO_GOAL: f64 = 0.2;
/// DESIGN.md §6: AtomicWriter update on tmpfs.
const ATOMIC_WRITE_FLOOR_US: f64 = 76.0;

/// Times `$n` sequential awaits of `$call` (which must succeed).
macro_rules! time_n {
    ($n:expr, $call:expr) => {{
        let mut samples = Vec::with_capacity($n);
        for _ in 0..$n {
            let t = Instant::now();
            $call.await.expect(stringify!($call));
            samples.push(t.elapsed());
        }
        samples
    }};
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (p50, p99) in µs.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: usize| us(samples[(samples.len() * q / 100).min(samples.len() - 1)]);
    (at(50), at(99))
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(&mut self, figure: &str, value: String, goal: &str, ratio: Option<f64>) {
        self.rows.push([
            figure.to_string(),
            value,
            goal.to_string(),
            ratio.map_or_else(|| "—".to_string(), |r| format!("{r:.2}")),
        ]);
    }

    fn print(&self) {
        let header = ["figure", "value", "goal / floor", "ratio"];
        let mut widths = header.map(str::len);
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 4]| {
            println!(
                "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3]
            );
        };
        line(header);
        println!("{}", "-".repeat(widths.iter().sum::<usize>() + 6));
        for row in &self.rows {
            line([&row[0], &row[1], &row[2], &row[3]]);
        }
    }
}

fn main() {
    let n: usize = std::env::var("CREDLET_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let setup = Instant::now();
    let registry = Registry::start_basic_auth(&[ALICE]).expect("registry");
    let app = build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push");
    // Token auth is what public registries (Docker Hub, GHCR, Harbor, ECR)
    // use; htpasswd makes the registry run bcrypt on every request.
    let token_registry = Registry::start_token_auth(
        &[ALICE],
        &[credlet_test_util::Grant::new(
            ALICE.0,
            "team/app",
            &["pull", "push"],
        )],
    )
    .expect("token registry");
    let token_app = build_and_push_image(&token_registry, "team/app", "v1", ALICE).expect("push");
    let containerd = Containerd::start_with(&[&registry, &token_registry]).expect("containerd");
    // Where the records live matters: every PullImage writes one.
    let state = match std::env::var_os("CREDLET_BENCH_STATE_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("state dir");
    let proxy_threads: usize = std::env::var("CREDLET_BENCH_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (records, _) = open_records(state.path());
    let verifier = verifier(&[&registry, &token_registry]);
    let pods = Arc::new(StaticPodIndex::new());
    let events = Arc::new(NoEvents);
    let make_guard = |ttl: Duration| {
        guard(
            GuardPolicy {
                ttl,
                ..GuardPolicy::default()
            },
            &records,
            &verifier,
            pods.clone(),
            events.clone(),
        )
    };
    let (cached_guard, _) = make_guard(Duration::from_secs(24 * 3600));
    // TTL 0: no verification is ever reused, every PullImage checks.
    let (checking_guard, checking_metrics) = make_guard(Duration::ZERO);

    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(proxy_threads)
        .thread_name("proxy")
        .enable_all()
        .build()
        .expect("proxy runtime");
    let socket = containerd.cri_socket();
    let relay_dir = tempfile::tempdir().expect("relay dir");
    let relay_socket = relay_dir.path().join("relay.sock");
    let (guarded, checking, passthrough, relay) = proxy_rt.block_on(async {
        (
            Proxy::start(socket, cached_guard).await,
            Proxy::start(socket, checking_guard).await,
            Proxy::start(socket, Arc::new(PassThrough)).await,
            tokio::spawn(byte_relay(
                tokio::net::UnixListener::bind(&relay_socket).expect("relay socket"),
                socket.to_path_buf(),
            )),
        )
    });
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut table = Table { rows: Vec::new() };
    let image = app.reference.as_str();
    let alice = auth(ALICE.0, ALICE.1);
    let pod = |i: usize| TestPod {
        namespace: "bench".into(),
        name: format!("pod-{i}"),
        uid: format!("00000000-0000-0000-0000-{i:012}"),
        auth: Some(alice.clone()),
    };

    client_rt.block_on(async {
        let mut direct = Kubelet::connect(socket).await;
        let mut proxied = guarded.kubelet().await;
        let mut checked = checking.kubelet().await;
        let mut pt = passthrough.kubelet().await;
        let mut relayed = Kubelet::connect(&relay_socket).await;
        // The image arrives through credlet, pulled with credentials.
        assert_eq!(
            proxied.pull(image, &pod(0)).await.expect("first pull"),
            app.config_digest
        );
        eprintln!("set-up {:?}; measuring (N = {n}) …", setup.elapsed());

        // --- 1. pass-through latency.
        let version = || VersionRequest {
            version: "v1".into(),
        };
        let list = || ListImagesRequest { filter: None };
        let rounds = 10;
        let per_round = n.div_ceil(rounds);
        for (name, is_version) in [("Version", true), ("ListImages", false)] {
            // Warm-up: connections, allocator, containerd caches.
            for _ in 0..300 {
                for k in [&mut direct, &mut proxied, &mut relayed] {
                    if is_version {
                        k.rt.version(version()).await.expect("warm");
                    } else {
                        k.im.list_images(list()).await.expect("warm");
                    }
                }
            }
            let (mut d, mut p, mut r) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                if is_version {
                    d.extend(time_n!(per_round, direct.rt.version(version())));
                    p.extend(time_n!(per_round, proxied.rt.version(version())));
                    r.extend(time_n!(per_round, relayed.rt.version(version())));
                } else {
                    d.extend(time_n!(per_round, direct.im.list_images(list())));
                    p.extend(time_n!(per_round, proxied.im.list_images(list())));
                    r.extend(time_n!(per_round, relayed.im.list_images(list())));
                }
            }
            let (d50, d99) = percentiles(&mut d);
            let (p50, p99) = percentiles(&mut p);
            let (r50, _) = percentiles(&mut r);
            table.row(
                &format!("{name}: direct p50 / p99"),
                format!("{d50:.1} / {d99:.1} µs"),
                "",
                None,
            );
            table.row(
                &format!("{name}: via credlet p50 / p99"),
                format!("{p50:.1} / {p99:.1} µs"),
                "",
                None,
            );
            table.row(
                &format!("{name}: added p50"),
                format!("{:.1} µs", p50 - d50),
                "goal ≤ 50 µs",
                Some((p50 - d50) / ADDED_P50_GOAL_US),
            );
            table.row(
                &format!("{name}: added p50 by a byte relay (floor)"),
                format!("{:.1} µs", r50 - d50),
                "credlet added / relay added",
                Some((p50 - d50) / (r50 - d50)),
            );
            table.row(
                &format!("{name}: added p99"),
                format!("{:.1} µs", p99 - d99),
                "",
                None,
            );
        }

        // --- 2. verifying a cached image for a new pod, on both kinds of
        // registry.
        let mut uid = 1;
        for (flavor, registry, app) in [
            ("htpasswd", &registry, &app),
            ("token", &token_registry, &token_app),
        ] {
            let image = app.reference.as_str();
            if flavor == "token" {
                // The image arrives through credlet, pulled with credentials.
                uid += 1;
                proxied.pull(image, &pod(uid)).await.expect("first pull");
            }
            // Warm-up (the verifier learns the registry's challenge, pools a
            // connection; containerd's resolver likewise).
            for _ in 0..2 {
                uid += 1;
                checked.pull(image, &pod(uid)).await.expect("warm");
                direct.pull(image, &pod(uid)).await.expect("warm");
            }
            let checks_before = checking_metrics.registry_checks.get();
            let before = traffic(registry, &app.name);
            let mut credlet = Vec::new();
            for _ in 0..VERIFY_RUNS {
                uid += 1;
                let t = Instant::now();
                let r = checked
                    .pull(image, &pod(uid))
                    .await
                    .expect("credlet verifies");
                credlet.push(t.elapsed());
                assert_eq!(r, app.config_digest);
            }
            let credlet_traffic = traffic(registry, &app.name) - before;
            // The check alone, in process: the floor of a verification.
            let reference = ImageRef::parse(image).expect("reference");
            let credential = Credential::basic(ALICE.0, ALICE.1).expect("credential");
            let expected_requests = if flavor == "token" { 2 } else { 1 };
            let mut alone = Vec::new();
            for _ in 0..VERIFY_RUNS {
                let t = Instant::now();
                let report = verifier
                    .verify(&reference, &app.digest, Some(&credential))
                    .await
                    .expect("verify");
                alone.push(t.elapsed());
                assert_eq!(report.requests(), expected_requests, "{report:?}");
            }
            assert_eq!(
                checking_metrics.registry_checks.get() - checks_before,
                VERIFY_RUNS as u64,
                "every PullImage was a registry check"
            );
            let before = traffic(registry, &app.name);
            let mut repull = Vec::new();
            for _ in 0..VERIFY_RUNS {
                uid += 1;
                let t = Instant::now();
                let r = direct
                    .pull(image, &pod(uid))
                    .await
                    .expect("containerd re-pulls");
                repull.push(t.elapsed());
                assert_eq!(r, app.config_digest);
            }
            let repull_traffic = traffic(registry, &app.name) - before;
            assert_eq!(
                repull_traffic.blob_gets, 0,
                "cached layers are not fetched again"
            );
            let (c, r) = (median(&mut credlet), median(&mut repull));
            let per_op = |t: support::Traffic| {
                format!(
                    "{:.1} req/op ({} HEAD, {} GET manifest, {} GET blob)",
                    t.total as f64 / VERIFY_RUNS as f64,
                    t.manifest_heads,
                    t.manifest_gets,
                    t.blob_gets
                )
            };
            table.row(
                &format!(
                    "{flavor} registry, new pod, cached image: credlet PullImage (median of 20)"
                ),
                format!("{:.2} ms", ms(c)),
                "",
                None,
            );
            table.row("  registry traffic", per_op(credlet_traffic), "", None);
            let floor = median(&mut alone);
            table.row(
                "  the registry check alone, in process (floor)",
                format!("{:.2} ms", ms(floor)),
                "credlet / floor",
                Some(c.as_secs_f64() / floor.as_secs_f64()),
            );
            table.row(
                &format!(
                    "{flavor} registry, new pod, cached image: containerd re-pull (median of 20)"
                ),
                format!("{:.2} ms", ms(r)),
                "",
                None,
            );
            table.row("  registry traffic", per_op(repull_traffic), "", None);
            let ratio = c.as_secs_f64() / r.as_secs_f64();
            table.row(
                "  time credlet / containerd",
                format!("{ratio:.3}"),
                "goal ≤ 0.20",
                Some(ratio / VERIFY_RATIO_GOAL),
            );
        }

        // --- 3. the cached decision.
        let image_status = || ImageStatusRequest {
            image: Some(spec(image)),
            verbose: false,
        };
        let cached_n = n.min(2_000);
        // A node's pods (at most 110 by default), each pulling again: every
        // pod already holds a grant, the record has a node's worth of them.
        let node_pod = |i: usize| pod(1_000_000 + i % NODE_PODS);
        for i in 0..2 * NODE_PODS {
            proxied.pull(image, &node_pod(i)).await.expect("warm");
            pt.im.image_status(image_status()).await.expect("warm");
        }
        let (mut cached, mut baseline, mut upstream) = (Vec::new(), Vec::new(), Vec::new());
        let before = traffic(&registry, &app.name);
        let mut i = 0;
        for _ in 0..rounds {
            for _ in 0..cached_n.div_ceil(rounds) {
                i += 1;
                let p = node_pod(i);
                let t = Instant::now();
                proxied.pull(image, &p).await.expect("cached");
                cached.push(t.elapsed());
            }
            baseline.extend(time_n!(
                cached_n.div_ceil(rounds),
                pt.im.image_status(image_status())
            ));
            upstream.extend(time_n!(
                cached_n.div_ceil(rounds),
                direct.im.image_status(image_status())
            ));
        }
        assert_eq!(
            traffic(&registry, &app.name) - before,
            support::Traffic::default(),
            "cached decisions ask no registry"
        );
        let (c50, c99) = percentiles(&mut cached);
        let (b50, _) = percentiles(&mut baseline);
        let (u50, _) = percentiles(&mut upstream);
        table.row(
            "cached PullImage via credlet p50 / p99",
            format!("{c50:.1} / {c99:.1} µs"),
            "",
            None,
        );
        table.row(
            "ImageStatus via pass-through proxy p50",
            format!("{b50:.1} µs"),
            "",
            None,
        );
        table.row(
            "  cached decision cost (difference)",
            format!("{:.1} µs", c50 - b50),
            "floor: atomic write 76 µs (§6)",
            Some((c50 - b50) / ATOMIC_WRITE_FLOOR_US),
        );
        table.row(
            "  vs ImageStatus direct (floor: its one upstream call)",
            format!("{u50:.1} µs"),
            "",
            Some(c50 / u50),
        );
    });

    // In process: the decision without the wire.
    let (decide, write, write_many) =
        decision_in_process(state.path(), &app.reference, &app.config_digest);
    table.row(
        "in process: decode + parse + HMAC + lookup + policy",
        format!("{decide:.2} µs"),
        "",
        None,
    );
    table.row(
        "in process: record write (behind the answer), 110 grants",
        format!("{write:.1} µs"),
        "floor: atomic write 76 µs (§6)",
        Some(write / ATOMIC_WRITE_FLOOR_US),
    );
    table.row(
        "in process: record write (behind the answer), 2,200 grants",
        format!("{write_many:.1} µs"),
        "floor: atomic write 76 µs (§6)",
        Some(write_many / ATOMIC_WRITE_FLOOR_US),
    );

    proxy_rt.block_on(async {
        relay.abort();
        guarded.stop().await;
        checking.stop().await;
        passthrough.stop().await;
    });
    println!();
    println!(
        "credlet-cri-bench: {} sequential calls per pass-through figure, proxy runtime {} worker thread(s), containerd {}, registry {} (htpasswd, TLS), state dir {}",
        n,
        proxy_threads,
        containerd.cri_socket().display(),
        registry.host(),
        state.path().display()
    );
    table.print();
}

/// The cheapest possible proxy: copies bytes between the client's
/// connection and its own connection to the runtime (the floor of any
/// proxy's added latency).
async fn byte_relay(listener: tokio::net::UnixListener, upstream: std::path::PathBuf) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Ok(mut runtime) = tokio::net::UnixStream::connect(&upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut runtime).await;
            }
        });
    }
}

/// (µs per decision, µs per record write with 110 and 2,200 grants)
/// measured in process.
fn decision_in_process(state: &std::path::Path, image: &str, image_id: &str) -> (f64, f64, f64) {
    use credlet_proto::cri::{
        AuthConfig, ImageSpec, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    };
    let dir = tempfile::tempdir_in(state).expect("dir");
    let (records, _) = RecordStore::open(dir.path()).expect("records");
    let policy = GuardPolicy::default();
    let request = PullImageRequest {
        image: Some(ImageSpec {
            image: image.into(),
            user_specified_image: image.into(),
            ..Default::default()
        }),
        auth: Some(AuthConfig {
            username: ALICE.0.into(),
            password: ALICE.1.into(),
            ..Default::default()
        }),
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod".into(),
                uid: "00000000-0000-0000-0000-000000000001".into(),
                namespace: "bench".into(),
                attempt: 0,
            }),
        }),
    }
    .encode_to_vec();
    let seed = Credential::basic(ALICE.0, ALICE.1).expect("credential");
    let id = records.credential_id(Some(&seed));
    records
        .update(image_id, Provenance::Credentials, |r| {
            r.verified.insert(id.clone(), unix(SystemTime::now()));
            true
        })
        .expect("seed record");

    let decide = || {
        let request = PullImageRequest::decode(request.as_slice()).expect("decode");
        let spec = request.image.expect("image");
        let reference = ImageRef::parse(&spec.image).expect("reference");
        let credential = Credential::from_auth_config(&request.auth.expect("auth"))
            .expect("auth")
            .expect("credential");
        let id = records.credential_id(Some(&credential));
        let provenance = records.with(image_id, |r| r.map(|r| r.provenance));
        let namespace = request
            .sandbox_config
            .and_then(|c| c.metadata)
            .map(|m| m.namespace)
            .unwrap_or_default();
        let required =
            policy.requires_verification(&namespace, std::slice::from_ref(&reference), provenance);
        let cached = records.with(image_id, |r| {
            r.is_some_and(|r| r.credential_verified(&id, policy.ttl, SystemTime::now()))
        });
        assert!(required && cached);
    };
    let rounds = 100_000;
    for _ in 0..1_000 {
        decide();
    }
    let t = Instant::now();
    for _ in 0..rounds {
        decide();
    }
    let per_decision = us(t.elapsed()) / rounds as f64;

    // A PullImage that changes the record (a grant) has that grant written
    // behind, off the request path, as a file of its own: its cost with a
    // node's pods, and with twenty times as many. Cached decisions that
    // change nothing write nothing.
    let now = unix(SystemTime::now());
    let mut round = 0;
    let mut write_with = |grants: usize| {
        let writes = 2_000;
        // The record holds `grants` grants before the measured writes.
        for i in 0..grants {
            records.change(image_id, Provenance::Credentials, |r| {
                r.grants.insert(
                    format!("00000000-0000-0000-0000-{i:012}"),
                    Grant {
                        credential: id.clone(),
                        verified_at: now,
                    },
                );
                true
            });
        }
        records.flush().expect("flush");
        round += 1;
        let t = Instant::now();
        for i in 0..writes {
            records
                .update(image_id, Provenance::Credentials, |r| {
                    r.grants.insert(
                        format!("00000000-0000-0000-0000-{:012}", i % grants),
                        Grant {
                            credential: id.clone(),
                            // A new verification each time: one write each.
                            verified_at: now + round * 10_000 + i as u64,
                        },
                    );
                    true
                })
                .expect("update");
            assert_eq!(records.flush().expect("flush"), 1);
        }
        us(t.elapsed()) / writes as f64
    };
    let node = write_with(NODE_PODS);
    let many = write_with(20 * NODE_PODS);
    (per_decision, node, many)
}
