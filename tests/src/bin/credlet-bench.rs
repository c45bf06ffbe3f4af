//! credlet's CSI and CA benchmarks against the real agent binary, real
//! sockets and real tmpfs mounts (run as root). Not a timed test: run it by
//! hand.
//!
//! ```text
//! cargo build --release -p credlet-tests --bins     # builds the bench and the agent
//! cargo run --release -p credlet-tests --bin credlet-bench -- all
//! ```
//!
//! Scenarios:
//! - `csi-publish`: NodePublishVolume latency, embedded development CA;
//! - `csi-rotation`: memory idle and with many volumes, CPU for rotating
//!   all of them, embedded development CA;
//! - `ca-issue`: the CA service's throughput through its real API: a real
//!   `credlet ca` process (TLS 1.3 mutual TLS on 127.0.0.1; TokenReviews
//!   and the CA's pod list and watch answered by a fake API server in this
//!   process), one HTTP/2 connection with many concurrent
//!   IssuePodCertificate calls, for new pods (every call a TokenReview; the
//!   pods from the CA's pod cache) and for renewals (tokens already in the
//!   CA's review cache), each also in `IssuePodCertificates` batches of 64
//!   with 2 calls open, as an agent under load sends them;
//! - `ca-issue-jwks`: the new-pod variants with the CA verifying tokens
//!   offline (`--token-verification jwks`): no TokenReview per new token;
//! - `csi-publish-remote`: NodePublishVolume latency with the agent asking
//!   a real `credlet ca` on loopback (`--ca-url`);
//! - `csi-publish-remote-jwks`: the same with the CA verifying tokens
//!   offline (`--token-verification jwks`) instead of a TokenReview each;
//! - `csi-rotation-remote`: agent and CA CPU for rotating many volumes
//!   through that CA (`credlet ca --min-duration 1s` lets the volumes ask
//!   for lifetimes of seconds);
//! - `csi-rotation-remote-unspread`: the same with the CA's renewal spread
//!   off, to compare the CA's peak renewal rate with and without it;
//! - `csi-volumes-remote`: agent RSS with 10,000 volumes of 24 h, then
//!   of 1 h certificates through that CA, tokens valid for an hour as the
//!   kubelet's are;
//! - `floors`: the crypto floor of DESIGN.md §6 measured again on this
//!   machine now (keygen, CSR, CSR verify, leaf), so that every other
//!   figure can be read against how fast the machine is today;
//! - `guard-record-write`: the image guard writing one pod's verification
//!   grant to its records (as it does behind a `PullImage` answer), with 10
//!   and with 10,000 grants on the node, beside one plain atomic write of a
//!   file of the same size measured in the same run;
//! - `all`: every one of them.
//!
//! Both processes are the `credlet-under-test` next to this executable.
//! Each figure is printed next to its goal and the floor cost measured on
//! this machine (DESIGN.md §6), as a ratio.
//!
//! Environment: `CREDLET_BENCH_VOLUMES` (rotation volumes, default 10000),
//! `CREDLET_BENCH_CONCURRENCY` (parallel CSI calls, default 16),
//! `CREDLET_BENCH_DURATION_S` (rotation certificate lifetime; default:
//! chosen from a pilot run so no volume renews before publishing ends),
//! `CREDLET_BENCH_STATE_ON_TMPFS=0` (state directory on the temporary
//! directory's disk instead of a tmpfs like the default `/run/credlet`),
//! `CREDLET_BENCH_TMPDIR_FS=host` (keep `TMPDIR` instead of a fresh
//! journaled ext4 loop filesystem for it, see [`on_journaled_tmpdir`]),
//! `CREDLET_BENCH_CA_REQUESTS` (IssuePodCertificate calls per `ca-issue`
//! variant, default 20000), `CREDLET_BENCH_CA_CONCURRENCY` (concurrent
//! streams on the one connection, default 64), `CREDLET_BENCH_CA_BIN`
//! (run `credlet ca` from this file instead: a copy shares no page cache
//! with the agent, so the agent's RSS is not inflated by the CA's pages).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use credlet_ca::{KeyType, PrivateKey};
use credlet_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use credlet_proto::ca::{
    IssueAgentCertificateRequest, IssuePodCertificateRequest, IssuePodCertificatesRequest,
    issue_pod_certificate_result,
};
use credlet_tests::cluster::{CaProcess, Cluster, DNS_TEMPLATE, NODE, agent_command};
use credlet_tests::harness::{
    CheckTime, Csi, Pod, TestEnv, Volume, check_volume, cpu_time, mounts_under, rss_kib,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// DESIGN.md §6: one pod certificate (keygen, CSR, sign, PEMs, atomic write).
const FLOOR_ONE_CERTIFICATE: Duration = Duration::from_micros(125);
/// DESIGN.md §6: 10,000 rotations.
const FLOOR_10K_ROTATIONS: Duration = Duration::from_millis(1300);
/// DESIGN.md §6: an idle tokio process.
const FLOOR_IDLE_RSS_KIB: f64 = 2.5 * 1024.0;

const PUBLISH_WARMUP: usize = 100;
const PUBLISH_MEASURED: usize = 2000;
const GOAL_PUBLISH_P99: Duration = Duration::from_millis(3);
const GOAL_IDLE_RSS_KIB: f64 = 8.0 * 1024.0;
const GOAL_LOADED_RSS_KIB: f64 = 32.0 * 1024.0;
const GOAL_ROTATION_CPU: Duration = Duration::from_secs(3);

/// DESIGN.md §6, the CA's share of one pod certificate: CSR verification
/// (56 µs) + leaf signing (24 µs).
const FLOOR_CA_CERTIFICATE: Duration = Duration::from_micros(80);
/// DESIGN.md §6, the agent's share of one remote rotation: keygen (12.7 µs)
/// + CSR signing (18 µs) + atomic write (76 µs).
const FLOOR_AGENT_REMOTE_ROTATION: Duration = Duration::from_nanos(106_700);
/// The CA's goal: certificates per CPU-second.
const GOAL_CA_PER_CORE: f64 = 10_000.0;
/// How many pods renew in the `ca-issue` renewal variant (their tokens
/// stay in the CA's review cache, which holds 10,000).
const CA_RENEWING_PODS: usize = 1000;
/// Entries per IssuePodCertificates call in `ca-issue`'s batched variants
/// (the agent's most).
const CA_BATCH: usize = 64;
/// Batch calls open at once (the agent's most).
const CA_BATCH_CALLS: usize = 2;
/// Lifetime of the CA-issued certificates in `ca-issue` and
/// `csi-publish-remote`.
const LONG_LIFETIME_S: u64 = 24 * 3600;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn agent_binary() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("credlet-under-test");
    ensure!(
        bin.exists(),
        "{} not found: build both binaries with `cargo build --release -p credlet-tests --bins`",
        bin.display()
    );
    Ok(bin)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: f64) -> String {
    format!("{:.1} MB", kib / 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// One result line: `name  value  (goal; floor → ratio)`.
fn line(name: &str, value: &str, note: &str) {
    println!("{name:<34} {value:>12}  ({note})");
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Publish,
    Unpublish,
}

/// Runs `op` on every volume with `concurrency` calls in flight; returns
/// the wall time.
async fn run_all(
    csi: &Csi,
    volumes: &Arc<Vec<Volume>>,
    op: Op,
    concurrency: usize,
) -> Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let csi = csi.clone();
        let volumes = Arc::clone(volumes);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(volume) = volumes.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                match op {
                    Op::Publish => csi.publish(volume).await,
                    Op::Unpublish => csi.unpublish_volume(volume).await,
                }
                .with_context(|| format!("{op:?} {}", volume.id))?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed())
}

fn make_volumes(env: &TestEnv, prefix: &str, count: usize, duration: &str) -> Arc<Vec<Volume>> {
    Arc::new(
        (0..count)
            .map(|i| {
                env.volume(&format!("{prefix}{i:05}"))
                    .with("credlet.io/duration", duration)
            })
            .collect(),
    )
}

async fn bench_publish(env: &mut TestEnv) -> Result<()> {
    println!(
        "== csi-publish: {PUBLISH_MEASURED} NodePublishVolume calls (after {PUBLISH_WARMUP} warm-up), one at a time, embedded CA, real tmpfs"
    );
    let csi = env.start().await;
    let volumes = make_volumes(env, "p", PUBLISH_WARMUP + PUBLISH_MEASURED, "24h");
    let mut publish = Vec::with_capacity(PUBLISH_MEASURED);
    for (i, volume) in volumes.iter().enumerate() {
        let started = Instant::now();
        csi.publish(volume)
            .await
            .with_context(|| format!("publish {}", volume.id))?;
        if i >= PUBLISH_WARMUP {
            publish.push(started.elapsed());
        }
    }
    // Spot-check what was written.
    for volume in volumes.iter().step_by(97) {
        check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    }
    let mut unpublish = Vec::with_capacity(volumes.len());
    for volume in volumes.iter() {
        let started = Instant::now();
        csi.unpublish_volume(volume)
            .await
            .with_context(|| format!("unpublish {}", volume.id))?;
        unpublish.push(started.elapsed());
    }
    ensure!(
        mounts_under(&env.root).is_empty(),
        "mounts left after unpublishing"
    );
    drop(csi);
    let status = env.stop().await;
    ensure!(status.success(), "agent exited with {status}");

    publish.sort();
    unpublish.sort();
    let floor = FLOOR_ONE_CERTIFICATE.as_secs_f64();
    let ratio = |d: Duration| format!("{:.1}×", d.as_secs_f64() / floor);
    let p50 = percentile(&publish, 0.50);
    let p90 = percentile(&publish, 0.90);
    let p99 = percentile(&publish, 0.99);
    let max = *publish.last().unwrap_or(&Duration::ZERO);
    line(
        "csi-publish p50",
        &ms(p50),
        &format!("floor 125 µs → {}", ratio(p50)),
    );
    line(
        "csi-publish p90",
        &ms(p90),
        &format!("floor 125 µs → {}", ratio(p90)),
    );
    line(
        "csi-publish p99",
        &ms(p99),
        &format!(
            "goal ≤ 3 ms {}; floor 125 µs → {}",
            verdict(p99 <= GOAL_PUBLISH_P99),
            ratio(p99)
        ),
    );
    line(
        "csi-publish max",
        &ms(max),
        &format!("floor 125 µs → {}", ratio(max)),
    );
    line(
        "csi-unpublish p50",
        &ms(percentile(&unpublish, 0.50)),
        "unmount + remove; no floor",
    );
    line(
        "csi-unpublish p99",
        &ms(percentile(&unpublish, 0.99)),
        "unmount + remove; no floor",
    );
    Ok(())
}

/// The payload directory a volume's `..data` link names: it changes with
/// every rotation (the agent logs renewals at debug level only).
fn payload_of(volume: &Volume) -> Option<std::ffi::OsString> {
    std::fs::read_link(volume.target.join("..data"))
        .ok()
        .map(std::path::PathBuf::into_os_string)
}

/// Marks the volumes whose payload changed since `initial` as rotated.
fn scan_rotations(
    volumes: &[Volume],
    initial: &[Option<std::ffi::OsString>],
    rotated: &mut [bool],
) -> usize {
    for (i, volume) in volumes.iter().enumerate() {
        if !rotated[i] && payload_of(volume) != initial[i] {
            rotated[i] = true;
        }
    }
    rotated.iter().filter(|r| **r).count()
}

/// Watches every volume's payload until each has been replaced once (within
/// the lifetime plus a minute of `published_at`). Returns how many had
/// already rotated when watching began.
async fn wait_for_rotations(
    volumes: &[Volume],
    published_at: Instant,
    duration_s: u64,
) -> Result<usize> {
    let count = volumes.len();
    let initial: Vec<_> = volumes.iter().map(payload_of).collect();
    ensure!(
        initial.iter().all(Option::is_some),
        "every published volume has a payload"
    );
    let mut rotated = vec![false; count];
    let early = scan_rotations(volumes, &initial, &mut rotated);
    let deadline = published_at + Duration::from_secs(duration_s) + Duration::from_secs(60);
    loop {
        let done = scan_rotations(volumes, &initial, &mut rotated);
        if done == count {
            return Ok(early);
        }
        ensure!(
            Instant::now() < deadline,
            "only {done} of {count} volumes rotated within {duration_s} s + 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn bench_rotation(env: &mut TestEnv) -> Result<()> {
    let count = env_usize("CREDLET_BENCH_VOLUMES", 10_000);
    let concurrency = env_usize("CREDLET_BENCH_CONCURRENCY", 16);
    println!(
        "== csi-rotation: {count} volumes, {concurrency} concurrent publishes, embedded CA, real tmpfs"
    );
    let csi = env.start().await;
    let pid = env.agent().pid();

    // Idle: memory, and the CPU an idle agent burns (subtracted later).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid)? as f64;
    let idle_window = Duration::from_secs(3);
    let cpu_before = cpu_time(pid)?;
    tokio::time::sleep(idle_window).await;
    let idle_cpu_rate = (cpu_time(pid)? - cpu_before).as_secs_f64() / idle_window.as_secs_f64();

    // Lifetime: renewals start at 50 % of it, which must come after the
    // last publish. A pilot run estimates how long publishing takes.
    let duration_s = match std::env::var("CREDLET_BENCH_DURATION_S") {
        Ok(v) => v.parse::<u64>().context("CREDLET_BENCH_DURATION_S")?,
        Err(_) => {
            let pilot = make_volumes(env, "pilot", 500.min(count), "24h");
            let took = run_all(&csi, &pilot, Op::Publish, concurrency).await?;
            run_all(&csi, &pilot, Op::Unpublish, concurrency).await?;
            let estimate = took.as_secs_f64() * count as f64 / pilot.len().max(1) as f64;
            (estimate * 3.0).ceil().max(40.0) as u64
        }
    };

    let volumes = make_volumes(env, "r", count, &format!("{duration_s}s"));
    let publish_wall = run_all(&csi, &volumes, Op::Publish, concurrency).await?;
    let published_at = Instant::now();
    let cpu_start = cpu_time(pid)?;
    let loaded_rss = rss_kib(pid)? as f64;

    let early = wait_for_rotations(&volumes, published_at, duration_s).await?;
    let rotation_wall = published_at.elapsed();
    let cpu_used = cpu_time(pid)? - cpu_start;
    let idle_share = Duration::from_secs_f64(idle_cpu_rate * rotation_wall.as_secs_f64());
    let rotation_cpu = cpu_used.saturating_sub(idle_share);
    let rotated_rss = rss_kib(pid)? as f64;

    // The files agree with the log: a sample is consistent and fresh.
    for volume in volumes.iter().step_by((count / 200).max(1)) {
        check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    }
    let log = env.log();
    let failures = log.matches("renewal failed").count();

    let unpublish_wall = run_all(&csi, &volumes, Op::Unpublish, concurrency).await?;
    ensure!(
        mounts_under(&env.root).is_empty(),
        "mounts left after unpublishing"
    );
    drop(csi);
    let status = env.stop().await;
    ensure!(status.success(), "agent exited with {status}");

    line(
        "csi-rotation idle RSS",
        &mib(idle_rss),
        &format!(
            "goal ≤ 8 MB {}; floor idle tokio 2.5 MB → {:.1}×",
            verdict(idle_rss <= GOAL_IDLE_RSS_KIB),
            idle_rss / FLOOR_IDLE_RSS_KIB
        ),
    );
    line(
        &format!("csi-rotation RSS, {count} volumes"),
        &mib(loaded_rss),
        &format!(
            "goal ≤ 32 MB {}; {:.2} KB per volume above idle; after rotating {}",
            verdict(loaded_rss <= GOAL_LOADED_RSS_KIB),
            (loaded_rss - idle_rss) / count as f64,
            mib(rotated_rss)
        ),
    );
    line(
        &format!("csi-rotation publish {count}"),
        &format!("{:.2} s", publish_wall.as_secs_f64()),
        &format!(
            "{concurrency} concurrent; {:.0}/s; {:.3} ms each",
            count as f64 / publish_wall.as_secs_f64(),
            publish_wall.as_secs_f64() * 1e3 / count as f64
        ),
    );
    let scaled_floor = FLOOR_10K_ROTATIONS.as_secs_f64() * count as f64 / 10_000.0;
    line(
        &format!("csi-rotation CPU, {count} rotations"),
        &format!("{:.2} s", rotation_cpu.as_secs_f64()),
        &format!(
            "goal ≤ {:.1} s {}; floor {:.2} s → {:.1}×",
            GOAL_ROTATION_CPU.as_secs_f64() * count as f64 / 10_000.0,
            verdict(
                rotation_cpu.as_secs_f64()
                    <= GOAL_ROTATION_CPU.as_secs_f64() * count as f64 / 10_000.0
            ),
            scaled_floor,
            rotation_cpu.as_secs_f64() / scaled_floor
        ),
    );
    line(
        "csi-rotation details",
        &format!("{duration_s} s"),
        &format!(
            "lifetime; all rotated {:.1} s after publishing; {:.2} s CPU measured, {:.2} s idle share subtracted; \
             {early} already rotated when publishing ended; {failures} failed renewals",
            rotation_wall.as_secs_f64(),
            cpu_used.as_secs_f64(),
            idle_share.as_secs_f64()
        ),
    );
    line(
        &format!("csi-rotation unpublish {count}"),
        &format!("{:.2} s", unpublish_wall.as_secs_f64()),
        &format!("{concurrency} concurrent"),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The CA service: a real `credlet ca` process behind a fake API server
// ---------------------------------------------------------------------------

/// A real `credlet ca` and, for the CSI scenarios, a real agent using it.
struct Remote {
    cluster: Cluster,
    ca: CaProcess,
    agent: Option<TestEnv>,
    /// The agent pod's token, once that pod exists in the API server.
    agent_token: Option<String>,
}

impl Remote {
    /// Starts the fake API server and `credlet ca` with `extra` flags.
    async fn start(bin: &Path, extra: &[&str]) -> Result<Self> {
        let cluster = Cluster::start()?;
        let mut ca = CaProcess::new(bin, &cluster)?;
        ca.args.extend(extra.iter().map(Into::into));
        let mut remote = Self {
            cluster,
            ca,
            agent: None,
            agent_token: None,
        };
        if let Err(error) = remote.ca.start().await {
            remote.print_logs();
            return Err(error);
        }
        Ok(remote)
    }

    fn ca_pid(&self) -> u32 {
        self.ca.env.agent().pid()
    }

    /// Starts the agent with `--ca-url` (its token projected first) and
    /// waits until it is ready: it has its client certificate.
    async fn start_agent(&mut self, bin: &Path) -> Result<Csi> {
        let mut env = TestEnv::new(bin);
        state_on_tmpfs(&env)?;
        let token = match &self.agent_token {
            Some(token) => token,
            None => self.agent_token.insert(self.cluster.agent_pod()?),
        };
        self.cluster.write_agent_token(token)?;
        let command = agent_command(&env, &self.cluster, &self.ca);
        env.spawn_command(command);
        let env = self.agent.insert(env);
        Ok(env.wait_ready().await)
    }

    fn agent(&mut self) -> &mut TestEnv {
        self.agent.as_mut().expect("agent started")
    }

    /// SIGTERM to the agent (if any), then the CA; both must exit 0.
    async fn stop(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.as_mut() {
            let status = agent.stop().await;
            ensure!(status.success(), "agent exited with {status}");
        }
        let status = self.ca.env.stop().await;
        ensure!(status.success(), "credlet ca exited with {status}");
        Ok(())
    }

    fn print_logs(&self) {
        print_tail("credlet ca", &self.ca.env.log());
        if let Some(agent) = &self.agent {
            print_tail("agent", &agent.log());
        }
    }
}

fn print_tail(what: &str, log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    eprintln!("---- last lines of the {what} log ----\n{tail}\n----");
}

/// The bench's own client of the CA API: TLS 1.3 (ring) to 127.0.0.1,
/// trusting `root_pem`, with an optional client certificate; one HTTP/2
/// connection shared by every clone.
async fn ca_client(
    port: u16,
    root_pem: &str,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<CertificateAuthorityClient<Channel>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(der.context("CA root PEM")?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = Endpoint::try_from(format!("https://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .context("connect to the CA")?;
    Ok(CertificateAuthorityClient::new(channel))
}

/// What an agent does first: a client certificate for [`NODE`] from
/// IssueAgentCertificate with the agent pod's token; returns a client
/// presenting it.
async fn bootstrap_agent_client(remote: &Remote) -> Result<CertificateAuthorityClient<Channel>> {
    let root = &remote.cluster.root_pem;
    let mut bootstrap = ca_client(remote.ca.port, root, None).await?;
    let key = PrivateKey::generate(KeyType::EcdsaP256)?;
    let issued = bootstrap
        .issue_agent_certificate(IssueAgentCertificateRequest {
            csr_der: key.certificate_signing_request()?,
            token: remote.cluster.agent_pod()?,
            node_name: NODE.into(),
        })
        .await
        .context("IssueAgentCertificate")?
        .into_inner();
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("agent certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key.pem().as_bytes()).context("agent key")?;
    ca_client(remote.ca.port, root, Some((chain, key))).await
}

/// One IssuePodCertificate request as the agent sends it.
fn pod_request(pod: &Pod, token: &str, csr_der: Vec<u8>) -> IssuePodCertificateRequest {
    IssuePodCertificateRequest {
        csr_der,
        token: token.to_owned(),
        pod_namespace: pod.namespace.clone(),
        pod_name: pod.name.clone(),
        pod_uid: pod.uid.clone(),
        service_account: pod.service_account.clone(),
        dns_name_templates: vec![DNS_TEMPLATE.into()],
        duration_seconds: LONG_LIFETIME_S,
        ..Default::default()
    }
}

/// Sends every request with `concurrency` calls in flight on `client`'s
/// connection; returns the wall time and every call's latency.
async fn issue_all(
    client: &CertificateAuthorityClient<Channel>,
    requests: &Arc<Vec<IssuePodCertificateRequest>>,
    concurrency: usize,
) -> Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let mut client = client.clone();
        let requests = Arc::clone(requests);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(requests.len() / concurrency.max(1) + 1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    return Ok::<_, anyhow::Error>(latencies);
                };
                let request = request.clone();
                let call = Instant::now();
                let issued = client
                    .issue_pod_certificate(request)
                    .await
                    .with_context(|| format!("IssuePodCertificate #{i}"))?
                    .into_inner();
                latencies.push(call.elapsed());
                ensure!(
                    issued.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"),
                    "IssuePodCertificate #{i}: no certificate in the answer"
                );
            }
        });
    }
    let mut latencies = Vec::with_capacity(requests.len());
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result??);
    }
    let wall = started.elapsed();
    latencies.sort();
    Ok((wall, latencies))
}

/// `12345.6` → `12,346`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How `ca-issue` sends its requests.
#[derive(Clone, Copy, Debug)]
enum CaCalls {
    /// One IssuePodCertificate per certificate, this many in flight.
    Single { concurrency: usize },
    /// IssuePodCertificates with `size` entries, `in_flight` calls open
    /// (what an agent under load sends).
    Batched { size: usize, in_flight: usize },
}

/// Sends `requests` in batches of `size`, `in_flight` calls open; returns
/// the wall time and every call's latency.
async fn issue_batches(
    client: &CertificateAuthorityClient<Channel>,
    batches: &Arc<Vec<IssuePodCertificatesRequest>>,
    in_flight: usize,
) -> Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let mut client = client.clone();
        let batches = Arc::clone(batches);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(batch) = batches.get(i) else {
                    return Ok::<_, anyhow::Error>(latencies);
                };
                let batch = batch.clone();
                let entries = batch.requests.len();
                let call = Instant::now();
                let answer = client
                    .issue_pod_certificates(batch)
                    .await
                    .with_context(|| format!("IssuePodCertificates #{i}"))?
                    .into_inner();
                latencies.push(call.elapsed());
                ensure!(
                    answer.results.len() == entries
                        && answer.results.iter().all(|r| matches!(
                            r.result,
                            Some(issue_pod_certificate_result::Result::Issued(_))
                        )),
                    "IssuePodCertificates #{i}: not every entry issued"
                );
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result??);
    }
    let wall = started.elapsed();
    latencies.sort();
    Ok((wall, latencies))
}

/// One measured `ca-issue` run and its report.
async fn measure_ca_issue(
    remote: &Remote,
    client: &CertificateAuthorityClient<Channel>,
    label: &str,
    requests: &Arc<Vec<IssuePodCertificateRequest>>,
    calls: CaCalls,
) -> Result<()> {
    let ca_pid = remote.ca_pid();
    // Batches are cut before the clock.
    let batches = match calls {
        CaCalls::Batched { size, .. } => Arc::new(
            requests
                .chunks(size.max(1))
                .map(|chunk| IssuePodCertificatesRequest {
                    requests: chunk.to_vec(),
                })
                .collect::<Vec<_>>(),
        ),
        CaCalls::Single { .. } => Arc::new(Vec::new()),
    };
    let (reviews_before, gets_before) = remote.cluster.api_calls();
    let ca_before = cpu_time(ca_pid)?;
    let own_before = cpu_time(std::process::id())?;
    let (wall, latencies) = match calls {
        CaCalls::Single { concurrency } => issue_all(client, requests, concurrency).await?,
        CaCalls::Batched { in_flight, .. } => issue_batches(client, &batches, in_flight).await?,
    };
    let (how, latency_of) = match calls {
        CaCalls::Single { concurrency } => (
            format!("{concurrency} streams on one HTTP/2 connection"),
            format!("call latency with {concurrency} in flight"),
        ),
        CaCalls::Batched { size, in_flight } => (
            format!(
                "IssuePodCertificates of {size}, {in_flight} calls open on one HTTP/2 connection"
            ),
            format!("latency of a {size}-entry call with {in_flight} open"),
        ),
    };
    let ca_cpu = cpu_time(ca_pid)? - ca_before;
    let own_cpu = cpu_time(std::process::id())? - own_before;
    let (reviews_after, gets_after) = remote.cluster.api_calls();

    let n = requests.len() as f64;
    let wall_rate = n / wall.as_secs_f64();
    let per_core = n / ca_cpu.as_secs_f64().max(1e-9);
    let cpu_each = ca_cpu.as_secs_f64() / n;
    let floor = FLOOR_CA_CERTIFICATE.as_secs_f64();
    line(
        &format!("ca-issue {label} wall"),
        &format!("{}/s", thousands(wall_rate)),
        &format!(
            "{} certificates, {how}, {:.2} s",
            thousands(n),
            wall.as_secs_f64()
        ),
    );
    line(
        &format!("ca-issue {label} per core"),
        &format!("{}/s", thousands(per_core)),
        &format!(
            "goal ≥ 10,000/s {}; floor 12,500/s (80 µs) → {:.1}×; {:.0} µs CA CPU per certificate",
            verdict(per_core >= GOAL_CA_PER_CORE),
            cpu_each / floor,
            cpu_each * 1e6
        ),
    );
    line(
        &format!("ca-issue {label} p50"),
        &ms(percentile(&latencies, 0.50)),
        &latency_of,
    );
    line(
        &format!("ca-issue {label} p99"),
        &ms(percentile(&latencies, 0.99)),
        &format!(
            "{latency_of}; max {}",
            ms(*latencies.last().unwrap_or(&Duration::ZERO))
        ),
    );
    line(
        &format!("ca-issue {label} API calls"),
        &format!(
            "{:.2} + {:.2}",
            (reviews_after - reviews_before) as f64 / n,
            (gets_after - gets_before) as f64 / n
        ),
        "TokenReviews + pod GETs per certificate at the fake API server",
    );
    line(
        &format!("ca-issue {label} CPU"),
        &format!("{:.2} s", ca_cpu.as_secs_f64()),
        &format!(
            "the CA process; this process (client + fake API server) {:.2} s",
            own_cpu.as_secs_f64()
        ),
    );
    Ok(())
}

/// `jwks`: the CA verifies tokens offline (`--token-verification jwks`);
/// then only new pods are measured (renewals hit the same token cache).
async fn bench_ca_issue(remote: &mut Remote, jwks: bool) -> Result<()> {
    let variant = if jwks { "jwks " } else { "" };
    let count = env_usize("CREDLET_BENCH_CA_REQUESTS", 20_000).max(1);
    let concurrency = env_usize("CREDLET_BENCH_CA_CONCURRENCY", 64).max(1);
    let renewing = CA_RENEWING_PODS.min(count);
    println!(
        "== ca-issue{}: {count} IssuePodCertificate calls per variant, {concurrency} concurrent streams on one HTTP/2 connection, \
         TLS 1.3 mTLS on loopback, fake API server in this process",
        if jwks {
            " (tokens verified offline)"
        } else {
            ""
        }
    );

    // Everything before the clock: the agent's client certificate, the
    // pods and their tokens, the CSRs.
    let client = bootstrap_agent_client(remote).await?;
    let prepared = Instant::now();
    let csrs = (0..count)
        .map(|_| {
            PrivateKey::generate(KeyType::EcdsaP256)
                .and_then(|key| key.certificate_signing_request())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let new_pods = (0..count)
        .map(|i| remote.cluster.app_pod(&format!("n{i:05}")))
        .collect::<Result<Vec<_>>>()?;
    let renewing_pods = (0..renewing)
        .map(|i| remote.cluster.app_pod(&format!("r{i:05}")))
        .collect::<Result<Vec<_>>>()?;
    let new_requests: Arc<Vec<_>> = Arc::new(
        new_pods
            .iter()
            .zip(&csrs)
            .map(|((pod, token), csr)| pod_request(pod, token, csr.clone()))
            .collect(),
    );
    let renewal_requests: Arc<Vec<_>> = Arc::new(
        csrs.iter()
            .enumerate()
            .map(|(i, csr)| {
                let (pod, token) = &renewing_pods[i % renewing];
                pod_request(pod, token, csr.clone())
            })
            .collect(),
    );
    let warm_up: Arc<Vec<_>> = Arc::new(renewal_requests[..renewing].to_vec());
    println!(
        "(prepared {count} CSRs and {} pods with tokens in {:.1} s)",
        count + renewing,
        prepared.elapsed().as_secs_f64()
    );

    // A certificate as the agent would get it.
    let sample = client
        .clone()
        .issue_pod_certificate(renewal_requests[0].clone())
        .await
        .context("IssuePodCertificate")?
        .into_inner();
    let leaf = credlet_ca::inspect_leaf(&sample.chain_pem)?;
    credlet_ca::verify_chain(
        &sample.chain_pem,
        &remote.cluster.root_pem,
        SystemTime::now(),
    )?;
    ensure!(
        leaf.dns_names == [format!("{}.shop.svc", renewing_pods[0].0.name)],
        "unexpected DNS names {:?}",
        leaf.dns_names
    );

    let single = CaCalls::Single { concurrency };
    let batched = CaCalls::Batched {
        size: CA_BATCH,
        in_flight: CA_BATCH_CALLS,
    };
    // (a) A burst of new pods: every token is new to the CA.
    issue_all(&client, &warm_up, concurrency).await?;
    let label = format!("{variant}new pods");
    measure_ca_issue(remote, &client, &label, &new_requests, single).await?;

    // (b) Renewals: the same pods' tokens again, reviewed once before the
    // clock (the new pods' tokens pushed them out of the review cache).
    if !jwks {
        issue_all(&client, &warm_up, concurrency).await?;
        measure_ca_issue(remote, &client, "renewals", &renewal_requests, single).await?;
    }

    // (c), (d): the same in IssuePodCertificates batches, as an agent sends
    // the requests that queue up under load; new pods of their own.
    let batch_requests: Arc<Vec<_>> = Arc::new(
        (0..count)
            .map(|i| remote.cluster.app_pod(&format!("b{i:05}")))
            .zip(&csrs)
            .map(|(pod, csr)| pod.map(|(pod, token)| pod_request(&pod, &token, csr.clone())))
            .collect::<Result<Vec<_>>>()?,
    );
    let label = format!("{variant}new pods batched");
    measure_ca_issue(remote, &client, &label, &batch_requests, batched).await?;
    if !jwks {
        issue_all(&client, &warm_up, concurrency).await?;
        measure_ca_issue(
            remote,
            &client,
            "renewals batched",
            &renewal_requests,
            batched,
        )
        .await?;
        println!(
            "(renewals: {renewing} pods, each token reviewed once before the clock; pods from the CA's pod cache)"
        );
    }
    let log = remote.ca.env.log();
    let denied = log.matches("request denied").count() + log.matches("request failed").count();
    ensure!(denied == 0, "the CA denied or failed {denied} requests");
    Ok(())
}

/// `count` volumes of new pods (pod and token in the API server) asking
/// for `duration` through the remote CA.
fn remote_volumes(
    remote: &Remote,
    prefix: &str,
    count: usize,
    duration: &str,
) -> Result<Arc<Vec<Volume>>> {
    let env = remote.agent.as_ref().context("agent not started")?;
    let volumes = (0..count)
        .map(|i| {
            let (volume, _) = remote.cluster.app(env, &format!("{prefix}{i:05}"))?;
            Ok(volume.with("credlet.io/duration", duration))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(volumes))
}

/// `label`: `csi-publish-remote`, or `csi-publish-remote-jwks` with the CA
/// verifying tokens offline.
async fn bench_publish_remote(remote: &mut Remote, bin: &Path, label: &str) -> Result<()> {
    let tokens = if label.ends_with("jwks") {
        "tokens verified offline against the issuer keys"
    } else {
        "TokenReview each"
    };
    println!(
        "== {label}: {PUBLISH_MEASURED} NodePublishVolume calls (after {PUBLISH_WARMUP} warm-up), one at a time, \
         real credlet ca on loopback ({tokens}, pods from its pod cache), real tmpfs"
    );
    let csi = remote.start_agent(bin).await?;
    let volumes = remote_volumes(
        remote,
        "p",
        PUBLISH_WARMUP + PUBLISH_MEASURED,
        &format!("{LONG_LIFETIME_S}s"),
    )?;
    let agent_pid = remote.agent().agent().pid();
    let ca_pid = remote.ca_pid();
    let mut publish = Vec::with_capacity(PUBLISH_MEASURED);
    let mut cpu_start = None;
    for (i, volume) in volumes.iter().enumerate() {
        if i == PUBLISH_WARMUP {
            cpu_start = Some((cpu_time(agent_pid)?, cpu_time(ca_pid)?));
        }
        let started = Instant::now();
        csi.publish(volume)
            .await
            .with_context(|| format!("publish {}", volume.id))?;
        if i >= PUBLISH_WARMUP {
            publish.push(started.elapsed());
        }
    }
    let (agent_start, ca_start) = cpu_start.context("no measured publishes")?;
    let agent_cpu = cpu_time(agent_pid)? - agent_start;
    let ca_cpu = cpu_time(ca_pid)? - ca_start;
    for volume in volumes.iter().step_by(97) {
        let files = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
        credlet_ca::verify_chain(&files.chain, &remote.cluster.root_pem, SystemTime::now())?;
    }
    for volume in volumes.iter() {
        csi.unpublish_volume(volume)
            .await
            .with_context(|| format!("unpublish {}", volume.id))?;
    }
    ensure!(
        mounts_under(&remote.agent().root).is_empty(),
        "mounts left after unpublishing"
    );
    drop(csi);
    remote.stop().await?;

    publish.sort();
    let floor = (FLOOR_AGENT_REMOTE_ROTATION + FLOOR_CA_CERTIFICATE).as_secs_f64();
    let ratio = |d: Duration| format!("{:.1}×", d.as_secs_f64() / floor);
    let p50 = percentile(&publish, 0.50);
    let p99 = percentile(&publish, 0.99);
    line(
        &format!("{label} p50"),
        &ms(p50),
        &format!("floor 187 µs (agent 107 + CA 80) → {}", ratio(p50)),
    );
    line(
        &format!("{label} p90"),
        &ms(percentile(&publish, 0.90)),
        &format!("floor 187 µs → {}", ratio(percentile(&publish, 0.90))),
    );
    line(
        &format!("{label} p99"),
        &ms(p99),
        &format!(
            "goal ≤ 3 ms {}; floor 187 µs → {}",
            verdict(p99 <= GOAL_PUBLISH_P99),
            ratio(p99)
        ),
    );
    line(
        &format!("{label} max"),
        &ms(*publish.last().unwrap_or(&Duration::ZERO)),
        "slowest call",
    );
    let n = publish.len().max(1) as f64;
    line(
        &format!("{label} CPU each"),
        &format!("{:.0} µs", (agent_cpu + ca_cpu).as_secs_f64() * 1e6 / n),
        &format!(
            "agent {:.0} µs + CA {:.0} µs per publish",
            agent_cpu.as_secs_f64() * 1e6 / n,
            ca_cpu.as_secs_f64() * 1e6 / n
        ),
    );
    Ok(())
}

/// Agent memory with 10,000 volumes through the remote CA, as in a
/// cluster, for two lifetimes, each with a fresh agent: day-long
/// certificates, whose renewals lie far past the kubelet's tokens (valid
/// for an hour), and hour-long ones, whose tokens would still be valid at
/// the renewal in half an hour but are not held that long.
async fn bench_volumes_remote(remote: &mut Remote, bin: &Path) -> Result<()> {
    let count = env_usize("CREDLET_BENCH_VOLUMES", 10_000);
    let concurrency = env_usize("CREDLET_BENCH_CONCURRENCY", 16);
    println!(
        "== csi-volumes-remote: {count} volumes of 24 h and of 1 h certificates, tokens valid 1 h, \
         {concurrency} concurrent publishes, real credlet ca on loopback, real tmpfs"
    );
    for (prefix, lifetime) in [("d", "24h"), ("h", "1h")] {
        if let Some(agent) = remote.agent.as_mut() {
            let status = agent.stop().await;
            ensure!(status.success(), "agent exited with {status}");
        }
        let csi = remote.start_agent(bin).await?;
        let agent_pid = remote.agent().agent().pid();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_rss = rss_kib(agent_pid)? as f64;
        let volumes = remote_volumes(remote, prefix, count, lifetime)?;
        let publish_wall = run_all(&csi, &volumes, Op::Publish, concurrency).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let loaded_rss = rss_kib(agent_pid)? as f64;
        for volume in volumes.iter().step_by((count / 100).max(1)) {
            let files = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
            credlet_ca::verify_chain(&files.chain, &remote.cluster.root_pem, SystemTime::now())?;
        }
        run_all(&csi, &volumes, Op::Unpublish, concurrency).await?;
        ensure!(
            mounts_under(&remote.agent().root).is_empty(),
            "mounts left after unpublishing"
        );
        drop(csi);
        line(
            &format!("csi-volumes-remote RSS, {count} × {lifetime}"),
            &mib(loaded_rss),
            &format!(
                "goal ≤ 32 MB {}; {:.2} KB per volume above idle ({}); published in {:.2} s",
                verdict(loaded_rss <= GOAL_LOADED_RSS_KIB),
                (loaded_rss - idle_rss) / count as f64,
                mib(idle_rss),
                publish_wall.as_secs_f64()
            ),
        );
    }
    remote.stop().await
}

/// `label`: `csi-rotation-remote`, or `csi-rotation-remote-unspread` with
/// the CA's renewal spread off (`--renewal-spread-percent 0`).
async fn bench_rotation_remote(remote: &mut Remote, bin: &Path, label: &str) -> Result<()> {
    let count = env_usize("CREDLET_BENCH_VOLUMES", 10_000);
    let concurrency = env_usize("CREDLET_BENCH_CONCURRENCY", 16);
    println!(
        "== {label}: {count} volumes, {concurrency} concurrent publishes, real credlet ca on loopback \
         (--min-duration 1s{}), real tmpfs",
        if label.ends_with("unspread") {
            ", --renewal-spread-percent 0"
        } else {
            ""
        }
    );
    let csi = remote.start_agent(bin).await?;
    let agent_pid = remote.agent().agent().pid();
    let ca_pid = remote.ca_pid();

    // The CPU both burn idle (subtracted later).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_window = Duration::from_secs(3);
    let (agent_idle, ca_idle) = (cpu_time(agent_pid)?, cpu_time(ca_pid)?);
    tokio::time::sleep(idle_window).await;
    let agent_idle_rate =
        (cpu_time(agent_pid)? - agent_idle).as_secs_f64() / idle_window.as_secs_f64();
    let ca_idle_rate = (cpu_time(ca_pid)? - ca_idle).as_secs_f64() / idle_window.as_secs_f64();

    // Lifetime: renewals start at 50 % of it (the CA spreads them over
    // 50-70 %), which must come after the last publish.
    let duration_s = match std::env::var("CREDLET_BENCH_DURATION_S") {
        Ok(v) => v.parse::<u64>().context("CREDLET_BENCH_DURATION_S")?,
        Err(_) => {
            let pilot = remote_volumes(remote, "pilot", 500.min(count), "24h")?;
            let took = run_all(&csi, &pilot, Op::Publish, concurrency).await?;
            run_all(&csi, &pilot, Op::Unpublish, concurrency).await?;
            let estimate = took.as_secs_f64() * count as f64 / pilot.len().max(1) as f64;
            (estimate * 3.0).ceil().max(40.0) as u64
        }
    };

    let volumes = remote_volumes(remote, "r", count, &format!("{duration_s}s"))?;
    let publish_wall = run_all(&csi, &volumes, Op::Publish, concurrency).await?;
    let published_at = Instant::now();
    let agent_start = cpu_time(agent_pid)?;
    let ca_start = cpu_time(ca_pid)?;
    let (reviews_start, gets_start) = remote.cluster.api_calls();
    let loaded_rss = rss_kib(agent_pid)? as f64;
    let ca_log_offset = remote.ca.env.log().len();

    let early = wait_for_rotations(&volumes, published_at, duration_s).await?;
    let rotation_wall = published_at.elapsed();
    let agent_used = cpu_time(agent_pid)? - agent_start;
    let ca_used = cpu_time(ca_pid)? - ca_start;
    let (reviews_end, gets_end) = remote.cluster.api_calls();
    let agent_idle_share = Duration::from_secs_f64(agent_idle_rate * rotation_wall.as_secs_f64());
    let ca_idle_share = Duration::from_secs_f64(ca_idle_rate * rotation_wall.as_secs_f64());
    let agent_cpu = agent_used.saturating_sub(agent_idle_share);
    let ca_cpu = ca_used.saturating_sub(ca_idle_share);

    for volume in volumes.iter().step_by((count / 200).max(1)) {
        let files = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
        credlet_ca::verify_chain(&files.chain, &remote.cluster.root_pem, SystemTime::now())?;
    }
    let failures = remote.agent().log().matches("renewal failed").count();
    let ca_log = remote.ca.env.log();
    let renewal_rate = issued_per_second(ca_log.get(ca_log_offset..).unwrap_or(""));
    let denied =
        ca_log.matches("request denied").count() + ca_log.matches("request failed").count();

    let unpublish_wall = run_all(&csi, &volumes, Op::Unpublish, concurrency).await?;
    ensure!(
        mounts_under(&remote.agent().root).is_empty(),
        "mounts left after unpublishing"
    );
    drop(csi);
    remote.stop().await?;

    let scale = count as f64 / 10_000.0;
    line(
        &format!("{label} publish {count}"),
        &format!("{:.2} s", publish_wall.as_secs_f64()),
        &format!(
            "{concurrency} concurrent; {:.0}/s; {:.3} ms each; agent RSS then {}",
            count as f64 / publish_wall.as_secs_f64(),
            publish_wall.as_secs_f64() * 1e3 / count as f64,
            mib(loaded_rss)
        ),
    );
    let goal = GOAL_ROTATION_CPU.as_secs_f64() * scale;
    let agent_floor = FLOOR_AGENT_REMOTE_ROTATION.as_secs_f64() * count as f64;
    line(
        &format!("{label} agent CPU, {count}"),
        &format!("{:.2} s", agent_cpu.as_secs_f64()),
        &format!(
            "goal ≤ {goal:.1} s {}; floor {agent_floor:.2} s (107 µs each) → {:.1}×",
            verdict(agent_cpu.as_secs_f64() <= goal),
            agent_cpu.as_secs_f64() / agent_floor
        ),
    );
    let ca_floor = FLOOR_CA_CERTIFICATE.as_secs_f64() * count as f64;
    line(
        &format!("{label} CA CPU, {count}"),
        &format!("{:.2} s", ca_cpu.as_secs_f64()),
        &format!(
            "floor {ca_floor:.2} s (80 µs each) → {:.1}×; {} certificates per CA CPU-second",
            ca_cpu.as_secs_f64() / ca_floor,
            thousands(count as f64 / ca_cpu.as_secs_f64().max(1e-9))
        ),
    );
    line(
        &format!("{label} API calls"),
        &format!(
            "{:.2} + {:.2}",
            (reviews_end - reviews_start) as f64 / count as f64,
            (gets_end - gets_start) as f64 / count as f64
        ),
        "TokenReviews + pod GETs per rotation at the fake API server",
    );
    line(
        &format!("{label} CA peak"),
        &format!("{}/s", thousands(renewal_rate.peak as f64)),
        &format!(
            "most renewals the CA signed in one second; {} renewals over {} seconds, mean {:.0}/s",
            thousands(renewal_rate.total as f64),
            renewal_rate.seconds,
            renewal_rate.total as f64 / renewal_rate.seconds.max(1) as f64
        ),
    );
    line(
        &format!("{label} details"),
        &format!("{duration_s} s"),
        &format!(
            "lifetime; all rotated {:.1} s after publishing; CPU measured agent {:.2} s, CA {:.2} s, \
             idle shares subtracted {:.2} s, {:.2} s; {early} already rotated when publishing ended; \
             {failures} failed renewals; {denied} CA denials",
            rotation_wall.as_secs_f64(),
            agent_used.as_secs_f64(),
            ca_used.as_secs_f64(),
            agent_idle_share.as_secs_f64(),
            ca_idle_share.as_secs_f64()
        ),
    );
    line(
        &format!("{label} unpublish {count}"),
        &format!("{:.2} s", unpublish_wall.as_secs_f64()),
        &format!("{concurrency} concurrent"),
    );
    Ok(())
}

/// Certificates the CA logged as issued, by wall-clock second.
#[derive(Debug, Default)]
struct IssueRate {
    /// The busiest second's count.
    peak: usize,
    /// All of them.
    total: usize,
    /// From the first to the last second with any, inclusive.
    seconds: u64,
}

/// Counts the `pod certificate issued` lines of a CA log (text format, an
/// RFC 3339 timestamp first) per second.
fn issued_per_second(log: &str) -> IssueRate {
    let mut per_second: std::collections::BTreeMap<&str, usize> = Default::default();
    for line in log.lines().filter(|l| l.contains("pod certificate issued")) {
        // `2026-01-02T03:04:05.678901Z  INFO …`: bucket by the first 19.
        if let Some(second) = line
            .get(..19)
            .filter(|s| s.as_bytes().get(10) == Some(&b'T'))
        {
            *per_second.entry(second).or_default() += 1;
        }
    }
    let span = |s: &str| {
        let hms: Vec<u64> = s[11..].split(':').filter_map(|p| p.parse().ok()).collect();
        hms.iter().fold(0, |acc, v| acc * 60 + v)
    };
    let seconds = match (per_second.keys().next(), per_second.keys().next_back()) {
        (Some(first), Some(last)) => span(last).saturating_sub(span(first)) + 1,
        _ => 0,
    };
    IssueRate {
        peak: per_second.values().copied().max().unwrap_or(0),
        total: per_second.values().sum(),
        seconds,
    }
}

// ---------------------------------------------------------------------------
// Running scenarios
// ---------------------------------------------------------------------------

/// The agent's default state directory is /run/credlet, a tmpfs: measure
/// that (CREDLET_BENCH_STATE_ON_TMPFS=0 measures a disk state directory).
fn state_on_tmpfs(env: &TestEnv) -> Result<()> {
    if std::env::var("CREDLET_BENCH_STATE_ON_TMPFS").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    // The state directory on tmpfs (e.g. /run): records then cost no disk
    // journal work. They only matter while the tmpfs volumes exist, and
    // those do not survive a reboot either.
    std::fs::create_dir_all(&env.state_dir)?;
    rustix::mount::mount(
        "credlet-bench-state",
        &env.state_dir,
        "tmpfs",
        rustix::mount::MountFlags::NODEV | rustix::mount::MountFlags::NOSUID,
        c"mode=0700",
    )
    .context("mount tmpfs on the state directory")?;
    println!("(state directory on tmpfs)");
    Ok(())
}

/// Runs one scenario in a fresh environment; on failure prints the tail of
/// the logs before the environment (and its mounts) goes away.
/// Times `f` over `n` runs after a warm-up; the mean.
fn time_each(n: u32, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    for _ in 0..n / 10 {
        f()?;
    }
    let started = Instant::now();
    for _ in 0..n {
        f()?;
    }
    Ok(started.elapsed() / n)
}

/// The crypto floor of DESIGN.md §6 measured again now, on this machine,
/// in this process: how fast this run's machine is next to the one the
/// floors were measured on, and the most certificates per second a CA core
/// could sign with ring if nothing but the proof-of-possession check and
/// the leaf signature cost anything.
fn bench_floors() -> Result<()> {
    const RUNS: u32 = 3000;
    println!("== floors: ring P-256 on this machine now, {RUNS} runs each, one thread");
    let authority =
        credlet_ca::Authority::generate_self_signed(credlet_ca::Policy::new("cluster.local"))?;
    let key = PrivateKey::generate(KeyType::EcdsaP256)?;
    let csr = key.certificate_signing_request()?;
    let verified = credlet_ca::VerifiedCsr::from_der(&csr)?;
    let request = credlet_ca::IssuanceRequest {
        csr_der: Vec::new(),
        identity: credlet_ca::PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "3f1c2a9e-0000-4000-8000-000000000000".into(),
            service_account: "web".into(),
        },
        spiffe_id: None,
        dns_names: vec!["web-0.shop.svc".into()],
        ip_addresses: Vec::new(),
        common_name: None,
        duration: Duration::from_secs(LONG_LIFETIME_S),
    };
    let keygen = time_each(RUNS, || {
        PrivateKey::generate(KeyType::EcdsaP256)?;
        Ok(())
    })?;
    let csr_sign = time_each(RUNS, || {
        key.certificate_signing_request()?;
        Ok(())
    })?;
    let csr_verify = time_each(RUNS, || {
        credlet_ca::VerifiedCsr::from_der(&csr)?;
        Ok(())
    })?;
    let leaf = time_each(RUNS, || {
        authority.issue_verified(&verified, &request, SystemTime::now())?;
        Ok(())
    })?;
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    let vs = |d: Duration, floor_us: f64| {
        format!(
            "DESIGN.md §6: {floor_us} µs → {:.2}×",
            d.as_secs_f64() * 1e6 / floor_us
        )
    };
    line("floor P-256 keygen", &us(keygen), &vs(keygen, 12.7));
    line("floor CSR (sign)", &us(csr_sign), &vs(csr_sign, 18.0));
    line("floor CSR verify", &us(csr_verify), &vs(csr_verify, 56.0));
    line("floor leaf (sign + PEM)", &us(leaf), &vs(leaf, 24.0));
    let ca_each = csr_verify + leaf;
    line(
        "floor CA per core now",
        &format!("{}/s", thousands(1.0 / ca_each.as_secs_f64())),
        &format!(
            "CSR verify + leaf only, {} each; DESIGN.md §6: 12,500/s (80 µs)",
            us(ca_each)
        ),
    );
    Ok(())
}

/// Writes of one verification grant measured per grant count.
const GRANT_WRITES: u32 = 2000;

/// `guard-record-write`: what writing one pod's verification grant costs
/// the image guard's record store with 10 grants on the node and with
/// 10,000 (all of one image, the worst case: one record holds them all),
/// next to the floor measured now on the same filesystem: one plain
/// atomic write (create, write, rename; no fsync, as the store's) of a file
/// as large as one grant's. The two counts should cost the same.
fn bench_guard_record_write() -> Result<()> {
    use credlet_imageguard::credential::Credential;
    use credlet_imageguard::policy::Provenance;
    use credlet_imageguard::records::{Grant, RecordStore};
    println!(
        "== guard-record-write: one verification grant written (change + flush), {GRANT_WRITES} writes per grant count, on TMPDIR"
    );
    const IMAGE: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let uid = |i: usize| format!("3f1c2a9e-0000-4000-8000-{i:012}");
    // (mean cost of one grant write, bytes of one grant's file)
    let per_grant = |grants: usize| -> Result<(Duration, u64)> {
        let state = tempfile::tempdir()?;
        let (records, _) = RecordStore::open(state.path())?;
        let credential = records.credential_id(Some(&Credential::basic("alice", "secret")?));
        let grant = |i: usize, verified_at: u64| {
            records.change(IMAGE, Provenance::Credentials, |r| {
                r.grants.insert(
                    uid(i),
                    Grant {
                        credential: credential.clone(),
                        verified_at,
                    },
                );
                true
            })
        };
        records.update(IMAGE, Provenance::Credentials, |_| true)?;
        for i in 0..grants {
            grant(i, 1);
        }
        records.flush()?;
        // A new verification of one pod of the node, written as the guard
        // writes it behind the answer; a tenth as many first, untimed.
        let warm_up = GRANT_WRITES as usize / 10;
        let write = |n: usize| -> Result<()> {
            grant(n % grants, 2 + n as u64);
            ensure!(records.flush()? == 1, "one record written");
            Ok(())
        };
        for n in 0..warm_up {
            write(n)?;
        }
        let started = Instant::now();
        for n in warm_up..warm_up + GRANT_WRITES as usize {
            write(n)?;
        }
        let each = started.elapsed() / GRANT_WRITES;
        let size = std::fs::read_dir(state.path().join("imageguard/images"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten())
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("g-"))
            .map(|e| e.metadata().map(|m| m.len()))
            .transpose()?
            .unwrap_or(0);
        let written = records.get(IMAGE).map_or(0, |r| r.grants.len());
        ensure!(written == grants, "{written} grants, not {grants}");
        Ok((each, size))
    };
    let (few, size) = per_grant(10)?;
    // The floor: the same bytes (one grant's file), written atomically the
    // plain way; measured between and after the grant counts, the lower
    // counts (the machine's speed drifts within a run).
    let floor_dir = tempfile::tempdir()?;
    let body = vec![b'x'; usize::try_from(size)?];
    let target = floor_dir.path().join("grant.json");
    let tmp = floor_dir.path().join("grant.tmp");
    let atomic_write = |sync: bool| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&body)?;
        if sync {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, &target)?;
        Ok(())
    };
    let floor_between = time_each(GRANT_WRITES, || atomic_write(false))?;
    let (many, _) = per_grant(10_000)?;
    let floor = floor_between.min(time_each(GRANT_WRITES, || atomic_write(false))?);
    // For reference only: what one fsync would add (grants are written
    // behind the answer and a lost one is proved again, so the store does
    // not sync them).
    let synced = time_each(GRANT_WRITES / 10, || atomic_write(true))?;
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    let vs_floor = |d: Duration| d.as_secs_f64() / floor.as_secs_f64();
    line(
        "floor atomic write",
        &us(floor),
        &format!("create + write {size} B + rename, no fsync"),
    );
    line(
        "(atomic write + fsync)",
        &us(synced),
        "reference only: the store does not sync grants",
    );
    line(
        "grant write, 10 grants",
        &us(few),
        &format!("floor {} → {:.1}×", us(floor), vs_floor(few)),
    );
    line(
        "grant write, 10,000 grants",
        &us(many),
        &format!("floor {} → {:.1}×", us(floor), vs_floor(many)),
    );
    let ratio = many.as_secs_f64() / few.as_secs_f64();
    line(
        "grant write 10,000 / 10",
        &format!("{ratio:.2}×"),
        &format!("goal ≈ 1× (one file per grant) {}", verdict(ratio < 1.5)),
    );
    Ok(())
}

async fn scenario(bin: &Path, name: &str) -> Result<()> {
    match name {
        "floors" => bench_floors(),
        "guard-record-write" => bench_guard_record_write(),
        "csi-publish" | "csi-rotation" => local_scenario(bin, name).await,
        "ca-issue"
        | "ca-issue-jwks"
        | "csi-publish-remote"
        | "csi-publish-remote-jwks"
        | "csi-rotation-remote"
        | "csi-rotation-remote-unspread"
        | "csi-volumes-remote" => {
            // Short lifetimes only where rotations are measured.
            let flags: &[&str] = match name {
                "csi-rotation-remote" => &["--min-duration", "1s"],
                "csi-rotation-remote-unspread" => {
                    &["--min-duration", "1s", "--renewal-spread-percent", "0"]
                }
                "csi-publish-remote-jwks" | "ca-issue-jwks" => &["--token-verification", "jwks"],
                _ => &[],
            };
            // A CA from another file shares no page cache with the agent,
            // as on a real cluster where they are separate images or nodes.
            let ca_bin = std::env::var_os("CREDLET_BENCH_CA_BIN").map(PathBuf::from);
            let mut remote = Remote::start(ca_bin.as_deref().unwrap_or(bin), flags).await?;
            let result = match name {
                "ca-issue" => bench_ca_issue(&mut remote, false).await,
                "ca-issue-jwks" => bench_ca_issue(&mut remote, true).await,
                "csi-publish-remote" | "csi-publish-remote-jwks" => {
                    bench_publish_remote(&mut remote, bin, name).await
                }
                "csi-volumes-remote" => bench_volumes_remote(&mut remote, bin).await,
                _ => bench_rotation_remote(&mut remote, bin, name).await,
            };
            if result.is_err() {
                remote.print_logs();
            }
            result
        }
        other => Err(anyhow::anyhow!("unknown scenario {other:?}")),
    }
}

async fn local_scenario(bin: &Path, name: &str) -> Result<()> {
    let mut env = TestEnv::new(bin);
    state_on_tmpfs(&env)?;
    let result = match name {
        "csi-publish" => bench_publish(&mut env).await,
        _ => bench_rotation(&mut env).await,
    };
    if result.is_err() {
        print_tail("agent", &env.log());
    }
    result
}

const SCENARIOS: [&str; 11] = [
    "floors",
    "guard-record-write",
    "csi-publish",
    "csi-rotation",
    "ca-issue",
    "ca-issue-jwks",
    "csi-publish-remote",
    "csi-publish-remote-jwks",
    "csi-rotation-remote",
    "csi-rotation-remote-unspread",
    "csi-volumes-remote",
];

async fn run(which: &str) -> Result<()> {
    let bin = agent_binary()?;
    println!("credlet-bench: agent {}", bin.display());
    match which {
        "all" => {
            for name in SCENARIOS {
                scenario(&bin, name).await?;
            }
            Ok(())
        }
        one => scenario(&bin, one).await,
    }
}

/// Set in the re-executed bench whose `TMPDIR` is ready.
const TMPDIR_READY: &str = "CREDLET_BENCH_TMPDIR_READY";

/// Runs the bench again with `TMPDIR` (the kubelet root, agent logs and
/// test pods of every scenario) on a fresh ext4 filesystem with a journal,
/// in a loop-mounted sparse file, and removes it afterwards.
///
/// A node's kubelet directory lives on a journaling filesystem. ext4 without
/// a journal (the root filesystem of some virtual machines) checks, on every
/// new inode, whether candidates were deleted in the last seconds and skips
/// them; after the bench's own unpublishes that scan dominates `mkdir` of a
/// target path, which is not what a node sees. `CREDLET_BENCH_TMPDIR_FS=host`
/// keeps the inherited `TMPDIR`.
fn on_journaled_tmpdir(which: &str) -> Result<ExitCode> {
    use std::process::Command;
    let holder = tempfile::Builder::new()
        .prefix("credlet-bench-fs-")
        .tempdir()?;
    let image = holder.path().join("kubelet.ext4");
    let mount_point = holder.path().join("mnt");
    std::fs::create_dir(&mount_point)?;
    std::fs::File::create(&image)?.set_len(2 << 30)?;
    let run = |command: &mut Command| -> Result<()> {
        let status = command
            .status()
            .with_context(|| format!("run {command:?}"))?;
        ensure!(status.success(), "{command:?} exited with {status}");
        Ok(())
    };
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&image))
    .context("make the journaled test filesystem (or set CREDLET_BENCH_TMPDIR_FS=host)")?;
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mount_point))?;
    println!("(TMPDIR and the kubelet root on a fresh journaled ext4 loop filesystem)");
    let status = Command::new(std::env::current_exe()?)
        .arg(which)
        .env("TMPDIR", &mount_point)
        .env(TMPDIR_READY, "1")
        .status();
    let unmounted = run(Command::new("umount").arg(&mount_point));
    let status = status.context("run the bench")?;
    unmounted?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = match args.as_slice() {
        [one] if one == "all" || SCENARIOS.contains(&one.as_str()) => one.clone(),
        _ => {
            eprintln!("usage: credlet-bench <{}|all>", SCENARIOS.join("|"));
            eprintln!("build first: cargo build --release -p credlet-tests --bins");
            return ExitCode::from(2);
        }
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("credlet-bench: needs root (the agent mounts tmpfs volumes)");
        return ExitCode::from(2);
    }
    if std::env::var_os(TMPDIR_READY).is_none()
        && std::env::var("CREDLET_BENCH_TMPDIR_FS").as_deref() != Ok("host")
    {
        return match on_journaled_tmpdir(&which) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("credlet-bench: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("credlet-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&which)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("credlet-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
