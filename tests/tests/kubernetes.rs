//! credlet on a real one-node Kubernetes: kube-apiserver, etcd,
//! kube-controller-manager, kube-scheduler, the kubelet and containerd 2,
//! built from their Go modules (`test-util/k8s/build.sh`), with credlet
//! installed from `deploy/` and its image guard between the kubelet and
//! containerd (`credlet_test_util::cluster`). Every test checks what a user
//! would see: pod phases, files and handshakes from inside pods, Events,
//! API objects.
//!
//! One cluster serves every test of this binary; the tests run one at a
//! time (some restart the kubelet, the agent or the CA). Needs root.
//! `CREDLET_K8S_VERSION=v1.37.2` runs the suite against another release.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use credlet_test_util::cluster::{
    BUSYBOX_IMAGE, CREDLET_NAMESPACE, Cluster, ClusterOptions, CredletInstall, CredletOptions,
    binary_files,
};
use credlet_test_util::kubelet::{Kubelet, TestPod};
use credlet_test_util::{ImageSpec, PushedImage, Registry, build_and_push_image};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};

/// The probe's image (`src/bin/credlet-pod-probe.rs`).
const PROBE_IMAGE: &str = "credlet.test/probe:1";
/// Where pods mount their credlet volume.
const MOUNT: &str = "/var/run/credlet";
/// Registry users.
const ALICE: (&str, &str) = ("alice", "alice-pw");
const BOB: (&str, &str) = ("bob", "bob-pw");
/// The signer name `deploy/components/signer` gives `credlet ca`.
const SIGNER: &str = "credlet.io/pods";
const POD_TIMEOUT: Duration = Duration::from_secs(120);

struct Env {
    cluster: Mutex<Cluster>,
    credlet: CredletInstall,
    /// A private registry (htpasswd: alice and bob may pull everything).
    registry: Registry,
}

impl Env {
    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type TrialFn = fn(&Env) -> Result<()>;

/// Every test, in the order they run (the last ones restart credlet's
/// components and roll its CA over).
const TRIALS: [(&str, TrialFn); 12] = [
    (
        "csi_volume_has_the_pods_identity_and_rotates",
        csi_volume_has_the_pods_identity_and_rotates,
    ),
    (
        "csi_volume_files_belong_to_the_fs_group_and_user_namespaced_pods_read_them",
        csi_volume_files_belong_to_the_fs_group_and_user_namespaced_pods_read_them,
    ),
    (
        "host_network_pods_complete_mutual_tls",
        host_network_pods_complete_mutual_tls,
    ),
    (
        "pod_certificate_projection_is_signed_by_credlet",
        pod_certificate_projection_is_signed_by_credlet,
    ),
    (
        "pod_certificates_for_every_key_type",
        pod_certificates_for_every_key_type,
    ),
    (
        "image_guard_with_the_kubelets_default_verification",
        image_guard_with_the_kubelets_default_verification,
    ),
    (
        "image_guard_with_the_kubelet_never_verifying",
        image_guard_with_the_kubelet_never_verifying,
    ),
    (
        "image_guard_refuses_image_volumes_without_credentials",
        image_guard_refuses_image_volumes_without_credentials,
    ),
    (
        "ca_verifies_tokens_offline_against_the_issuers_keys",
        ca_verifies_tokens_offline_against_the_issuers_keys,
    ),
    (
        "agent_killed_volumes_stay_valid_and_rotation_resumes",
        agent_killed_volumes_stay_valid_and_rotation_resumes,
    ),
    (
        "ca_key_rotated_through_its_secret_reaches_volumes_and_bundle",
        ca_key_rotated_through_its_secret_reaches_volumes_and_bundle,
    ),
    (
        "helm_chart_installs_credlet_and_uninstalls_cleanly",
        helm_chart_installs_credlet_and_uninstalls_cleanly,
    ),
];

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    // Tests restart shared components: one at a time.
    args.test_threads = Some(1);
    let names = ["csi_volume_has_the_pods_identity_and_rotates"];
    if args.list {
        let trials = names.iter().map(|n| Trial::test(*n, || Ok(()))).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let env = match setup() {
        Ok(env) => Arc::new(env),
        Err(e) => {
            eprintln!("kubernetes tests: the cluster did not come up: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let trial = |name: &'static str, f: fn(&Env) -> Result<()>| {
        let env = env.clone();
        Trial::test(name, move || {
            f(&env).map_err(|e| Failed::from(format!("{e:#}")))
        })
    };
    let trials = TRIALS.iter().map(|(n, f)| trial(n, *f)).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(env);
    conclusion.exit_code()
}

fn setup() -> Result<Env> {
    let credlet = std::path::PathBuf::from(env!("CARGO_BIN_EXE_credlet-under-test"));
    let probe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_credlet-pod-probe"));
    let started = Instant::now();
    let registry = Registry::start_basic_auth(&[ALICE, BOB])?;
    let registry_ca = registry.ca_pem_path();
    let cluster = Cluster::start(ClusterOptions {
        guard_binary: Some(credlet.clone()),
        guard_env: vec![(
            "CREDLET_REGISTRY_CA".into(),
            registry_ca.display().to_string(),
        )],
        registries: vec![(registry.host(), registry.ca_pem().to_string())],
        ..Default::default()
    })?;
    eprintln!(
        "kubernetes tests: Kubernetes {} up in {:.1?} ({})",
        cluster.programs().kubernetes_version,
        started.elapsed(),
        cluster.dir().display()
    );
    cluster.load_busybox()?;
    cluster.load_image(
        PROBE_IMAGE,
        &ImageSpec {
            files: binary_files(&[(&probe, "/probe")])?,
            entrypoint: vec!["/probe".into()],
            uncompressed: true,
            ..Default::default()
        },
    )?;
    let credlet = cluster.install_credlet(&CredletOptions {
        binary: credlet,
        ca_args: vec![
            // Volumes that rotate within a test.
            "--min-duration=20s".into(),
            "--dns-template=$POD_NAME.example".into(),
            "--allowed-ip-cidr=127.0.0.0/8".into(),
        ],
    })?;
    eprintln!(
        "kubernetes tests: credlet installed after {:.1?}",
        started.elapsed()
    );
    Ok(Env {
        cluster: Mutex::new(cluster),
        credlet,
        registry,
    })
}

/// Runs `f` on a fresh current-thread runtime with an admin client.
fn with_client<T>(cluster: &Cluster, f: impl AsyncFnOnce(kube::Client) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = cluster.client().await?;
        f(client).await
    })
}

/// A namespace with its `default` ServiceAccount and `sa` (created by the
/// controller manager and here).
async fn namespace(client: &kube::Client, name: &str, sa: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    let _ = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), name);
    if sa != "default" {
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": sa}}))?;
        let _ = sas.create(&PostParams::default(), &account).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sas.get_opt("default").await?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "no default ServiceAccount in {name}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn create_pod(client: &kube::Client, ns: &str, spec: Value) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(spec)?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// Waits until the pod's phase is one of `phases`; fails with its status
/// and Events otherwise.
async fn wait_for_phase(
    client: &kube::Client,
    ns: &str,
    name: &str,
    phases: &[&str],
    timeout: Duration,
) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let pod = pods.get(name).await?;
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phases.contains(&phase.as_str()) {
            return Ok(pod);
        }
        if Instant::now() > deadline {
            bail!(
                "pod {ns}/{name} is {phase:?}, not {phases:?}, after {timeout:?}; status: {}\nevents:\n{}",
                serde_json::to_string(&pod.status)?,
                events(client, ns, name).await?.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `reason: message` of the Events about `name` in `ns`.
async fn events(client: &kube::Client, ns: &str, name: &str) -> Result<Vec<String>> {
    let api = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?;
    Ok(list
        .items
        .iter()
        .map(|e| {
            format!(
                "{} {}: {}",
                e.source
                    .as_ref()
                    .and_then(|s| s.component.clone())
                    .unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            )
        })
        .collect())
}

async fn logs(client: &kube::Client, ns: &str, name: &str) -> Result<String> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .logs(name, &LogParams::default())
        .await?)
}

/// The JSON lines a probe printed.
async fn probe_reports(client: &kube::Client, ns: &str, name: &str) -> Result<Vec<Value>> {
    // No logs yet while the container is being created.
    Ok(logs(client, ns, name)
        .await
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

async fn delete_pod(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await?;
    let deadline = Instant::now() + POD_TIMEOUT;
    while pods.get_opt(name).await?.is_some() {
        ensure!(Instant::now() < deadline, "pod {ns}/{name} not gone");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// A pod running the probe's `check --every 1` over a credlet volume.
fn probe_pod(name: &str, sa: &str, attributes: Value) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": sa,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "probe",
                "image": PROBE_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["check", MOUNT, "--every", "1"],
                "volumeMounts": [{"name": "tls", "mountPath": MOUNT, "readOnly": true}],
            }],
            "volumes": [{
                "name": "tls",
                "csi": {"driver": "csi.credlet.io", "readOnly": true, "volumeAttributes": attributes},
            }],
        },
    })
}

fn csi_volume_has_the_pods_identity_and_rotates(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    let kubelet_root = cluster.kubelet_root();
    with_client(&cluster, async |client| {
        let ns = "csi-identity";
        namespace(&client, ns, "web").await?;
        create_pod(
            &client,
            ns,
            probe_pod(
                "web-0",
                "web",
                json!({
                    "credlet.io/dns-names": "${POD_NAME}.${POD_NAMESPACE}.svc,$POD_NAME.example",
                    "credlet.io/ip-addresses": "127.0.0.9",
                    "credlet.io/spiffe-id": "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/${SERVICE_ACCOUNT_NAME}/web",
                    "credlet.io/duration": "30s",
                }),
            ),
        )
        .await?;
        let pod = wait_for_phase(&client, ns, "web-0", &["Running"], POD_TIMEOUT).await?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();

        // The first report: the pod's identity, a key that matches.
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            let reports = probe_reports(&client, ns, "web-0").await?;
            if let Some(r) = reports.iter().find(|r| r.get("serial").is_some()) {
                break r.clone();
            }
            ensure!(
                Instant::now() < deadline,
                "no report from the probe: {reports:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ensure!(first["key_match"] == true, "key does not match: {first}");
        ensure!(first["chain_ok"] == true, "chain does not verify: {first}");
        ensure!(
            first["uris"] == json!(["spiffe://cluster.local/ns/csi-identity/sa/web/web"]),
            "URI SANs: {first}"
        );
        let mut dns: Vec<String> = serde_json::from_value(first["dns"].clone())?;
        dns.sort();
        ensure!(
            dns == ["web-0.csi-identity.svc", "web-0.example"],
            "DNS SANs: {first}"
        );
        ensure!(first["ips"] == json!(["127.0.0.9"]), "IP SANs: {first}");

        // A rotation, seen from inside the pod.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reports = probe_reports(&client, ns, "web-0").await?;
            let rotated: Vec<&Value> = reports
                .iter()
                .filter(|r| r.get("serial").is_some() && r["serial"] != first["serial"])
                .collect();
            if let Some(r) = rotated.first() {
                ensure!(
                    r["key_match"] == true && r["chain_ok"] == true,
                    "after rotation: {r}"
                );
                ensure!(r["uris"] == first["uris"], "identity changed: {r}");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no rotation within 60 s: {reports:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ensure!(
            !probe_reports(&client, ns, "web-0")
                .await?
                .iter()
                .any(|r| r.get("error").is_some()),
            "the probe saw a broken volume"
        );

        // Deleting the pod unpublishes: nothing of the volume stays.
        delete_pod(&client, ns, "web-0").await?;
        let pod_dir = kubelet_root.join("pods").join(&uid);
        let deadline = Instant::now() + Duration::from_secs(60);
        while pod_dir.exists() {
            ensure!(
                Instant::now() < deadline,
                "{} still exists; mounts: {:?}",
                pod_dir.display(),
                credlet_test_util::mount_points_below(&pod_dir)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    })
}

/// Waits until the probe in `ns/name` printed a report `accept` takes.
async fn wait_for_report(
    client: &kube::Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    accept: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let reports = probe_reports(client, ns, name).await?;
        if let Some(r) = reports.iter().find(|r| accept(r)) {
            return Ok(r.clone());
        }
        ensure!(
            Instant::now() < deadline,
            "{ns}/{name}: no report with {what} within {timeout:?}: {reports:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the logs of `ns/name` contain every one of `needles`.
async fn wait_for_log(
    client: &kube::Client,
    ns: &str,
    name: &str,
    needles: &[&str],
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = logs(client, ns, name).await.unwrap_or_default();
        if needles.iter().all(|n| log.contains(n)) {
            return Ok(log);
        }
        ensure!(
            Instant::now() < deadline,
            "{ns}/{name}: logs lack {needles:?} after {timeout:?}:\n{log}\nevents:\n{}",
            events(client, ns, name).await?.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A busybox pod running `script` with a credlet volume.
fn shell_pod(name: &str, script: &str, attributes: Value) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "sh",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "tls", "mountPath": MOUNT, "readOnly": true}],
            }],
            "volumes": [{
                "name": "tls",
                "csi": {"driver": "csi.credlet.io", "readOnly": true, "volumeAttributes": attributes},
            }],
        },
    })
}

fn csi_volume_files_belong_to_the_fs_group_and_user_namespaced_pods_read_them(
    env: &Env,
) -> Result<()> {
    let cluster = env.cluster();
    with_client(&cluster, async |client| {
        let ns = "csi-groups";
        namespace(&client, ns, "default").await?;
        let script = format!(
            "id; stat -L -c 'mode=%a group=%g %n' {MOUNT}/tls.key {MOUNT}/tls.crt; \
             cat {MOUNT}/tls.key > /dev/null && echo KEY-READABLE; \
             head -c 27 {MOUNT}/tls.crt; echo; sleep 3600"
        );
        // A non-root pod with an fsGroup: the kubelet passes the group
        // (VOLUME_MOUNT_GROUP), the key is 0440 and the group's.
        let mut pod = shell_pod("grouped", &script, json!({}));
        pod["spec"]["securityContext"] =
            json!({"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 3000});
        create_pod(&client, ns, pod).await?;
        let log = wait_for_log(
            &client,
            ns,
            "grouped",
            &["KEY-READABLE", "-----BEGIN CERTIFICATE-----"],
            POD_TIMEOUT,
        )
        .await?;
        ensure!(log.contains("uid=1000"), "runs as 1000: {log}");
        ensure!(
            log.contains(&format!("mode=440 group=3000 {MOUNT}/tls.key")),
            "key mode and group: {log}"
        );
        ensure!(
            log.contains(&format!("mode=444 group=3000 {MOUNT}/tls.crt")),
            "certificate mode and group: {log}"
        );

        // A pod in its own user namespace (hostUsers: false) as root
        // inside: it reads its key through the runtime's idmapped mount.
        let mut pod = shell_pod("userns", &script, json!({}));
        pod["spec"]["hostUsers"] = json!(false);
        create_pod(&client, ns, pod).await?;
        let log = wait_for_log(
            &client,
            ns,
            "userns",
            &["KEY-READABLE", "-----BEGIN CERTIFICATE-----"],
            POD_TIMEOUT,
        )
        .await?;
        ensure!(
            log.contains("uid=0(root)") || log.contains("uid=0 "),
            "root inside: {log}"
        );
        delete_pod(&client, ns, "grouped").await?;
        delete_pod(&client, ns, "userns").await
    })
}

fn host_network_pods_complete_mutual_tls(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    let addr = format!("{}:{}", cluster.node_ip(), credlet_test_util::free_port()?);
    with_client(&cluster, async |client| {
        let ns = "mtls";
        namespace(&client, ns, "server").await?;
        namespace(&client, ns, "client").await?;
        let pod = |name: &str, sa: &str, args: Vec<String>, restart: &str| {
            let mut p = probe_pod(
                name,
                sa,
                json!({
                    "credlet.io/dns-names": "$POD_NAME.$POD_NAMESPACE.svc",
                }),
            );
            p["spec"]["hostNetwork"] = json!(true);
            p["spec"]["restartPolicy"] = json!(restart);
            p["spec"]["containers"][0]["args"] = json!(args);
            p
        };
        create_pod(
            &client,
            ns,
            pod(
                "mtls-server",
                "server",
                vec!["serve".into(), MOUNT.into(), addr.clone()],
                "Always",
            ),
        )
        .await?;
        wait_for_log(&client, ns, "mtls-server", &["listening"], POD_TIMEOUT).await?;
        create_pod(
            &client,
            ns,
            pod(
                "mtls-client",
                "client",
                vec![
                    "connect".into(),
                    MOUNT.into(),
                    addr.clone(),
                    "mtls-server.mtls.svc".into(),
                ],
                "Never",
            ),
        )
        .await?;
        let done = wait_for_phase(
            &client,
            ns,
            "mtls-client",
            &["Succeeded", "Failed"],
            POD_TIMEOUT,
        )
        .await?;
        let client_log = logs(&client, ns, "mtls-client").await?;
        ensure!(
            done.status.and_then(|s| s.phase).as_deref() == Some("Succeeded"),
            "client failed: {client_log}"
        );
        let answer: Value = serde_json::from_str(client_log.lines().last().unwrap_or_default())?;
        ensure!(answer["handshake"] == "ok", "client: {client_log}");
        ensure!(
            answer["server"]["uris"] == json!(["spiffe://cluster.local/ns/mtls/sa/server"]),
            "the server's identity: {client_log}"
        );
        let server_log =
            wait_for_log(&client, ns, "mtls-server", &["handshake"], POD_TIMEOUT).await?;
        let seen: Value = serde_json::from_str(
            server_log
                .lines()
                .find(|l| l.contains("handshake"))
                .unwrap_or_default(),
        )?;
        ensure!(seen["handshake"] == "ok", "server: {server_log}");
        ensure!(
            seen["client"]["uris"] == json!(["spiffe://cluster.local/ns/mtls/sa/client"]),
            "the client's identity: {server_log}"
        );
        delete_pod(&client, ns, "mtls-server").await?;
        delete_pod(&client, ns, "mtls-client").await
    })
}

/// The `status` of the PodCertificateRequests in `ns`, once one has a
/// condition.
fn pod_certificate_requests(cluster: &Cluster, ns: &str) -> Result<Vec<Value>> {
    let out = cluster.kubectl(&["-n", ns, "get", "podcertificaterequests", "-o", "json"])?;
    let list: Value = serde_json::from_slice(&out.stdout)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn pod_certificate_projection_is_signed_by_credlet(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    let ns = "pod-certs";
    let projected = |annotations: Value| {
        json!({"projected": {"sources": [
            {"podCertificate": {
                "signerName": SIGNER,
                "keyType": "ECDSAP256",
                "keyPath": "tls.key",
                "certificateChainPath": "tls.crt",
                "userAnnotations": annotations,
            }},
            {"clusterTrustBundle": {"signerName": SIGNER, "labelSelector": {}, "path": "ca.crt"}},
        ]}})
    };
    with_client(&cluster, async |client| {
        namespace(&client, ns, "native").await?;
        let mut pod = probe_pod("native", "native", json!({}));
        pod["spec"]["volumes"][0] = json!({"name": "tls"});
        pod["spec"]["volumes"][0]
            .as_object_mut()
            .context("volume")?
            .extend(
                projected(json!({"credlet.io/dns-names": "$POD_NAME.$POD_NAMESPACE.svc"}))
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
        create_pod(&client, ns, pod).await?;
        wait_for_phase(&client, ns, "native", &["Running"], POD_TIMEOUT).await?;
        let report = wait_for_report(&client, ns, "native", POD_TIMEOUT, "a certificate", |r| {
            r.get("serial").is_some()
        })
        .await?;
        ensure!(report["key_match"] == true, "key: {report}");
        ensure!(
            report["chain_ok"] == true,
            "chains to the ClusterTrustBundle: {report}"
        );
        ensure!(
            report["uris"] == json!(["spiffe://cluster.local/ns/pod-certs/sa/native"]),
            "identity: {report}"
        );
        ensure!(
            report["dns"] == json!(["native.pod-certs.svc"]),
            "DNS SANs from the annotation: {report}"
        );

        // A request for a name the CA does not allow is denied with
        // credlet's reason.
        let mut pod = probe_pod("denied", "native", json!({}));
        pod["spec"]["volumes"][0] = json!({"name": "tls"});
        pod["spec"]["volumes"][0]
            .as_object_mut()
            .context("volume")?
            .extend(
                projected(json!({"credlet.io/dns-names": "not-allowed.example.org"}))
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
        create_pod(&client, ns, pod).await?;
        Ok(())
    })?;
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let requests = pod_certificate_requests(&cluster, ns)?;
        let issued = requests.iter().find(|r| r["spec"]["podName"] == "native");
        let denied = requests.iter().find(|r| r["spec"]["podName"] == "denied");
        let condition = |r: Option<&Value>, kind: &str| {
            r.and_then(|r| r["status"]["conditions"].as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .find(|c| c["type"] == kind && c["status"] == "True")
        };
        if let (Some(_), Some(d)) = (condition(issued, "Issued"), condition(denied, "Denied")) {
            ensure!(d["reason"] == "DNSNameNotAllowed", "denial: {d}");
            ensure!(
                d["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("not-allowed.example.org"),
                "the message names the refused name: {d}"
            );
            let issued = issued.context("issued request")?;
            ensure!(
                issued["status"]["certificateChain"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("-----BEGIN CERTIFICATE-----"),
                "chain: {issued}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "requests not answered: {requests:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    with_client(&cluster, async |client| {
        delete_pod(&client, ns, "native").await?;
        delete_pod(&client, ns, "denied").await
    })
}

/// A `kubernetes.io/dockerconfigjson` Secret for `registry` and `user`.
async fn pull_secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
    registry: &Registry,
    user: (&str, &str),
) -> Result<()> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let config = json!({"auths": {registry.host(): {
        "username": user.0,
        "password": user.1,
        "auth": b64.encode(format!("{}:{}", user.0, user.1)),
    }}});
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": b64.encode(config.to_string())},
    }))?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

fn image_pod(name: &str, image: &str, secret: Option<&str>) -> Value {
    let mut pod = json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent"}],
        },
    });
    if let Some(s) = secret {
        pod["spec"]["imagePullSecrets"] = json!([{"name": s}]);
    }
    pod
}

/// Blob GETs of `image`'s layer in the registry's access log.
fn layer_downloads(registry: &Registry, image: &PushedImage) -> usize {
    registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains(&image.layer_digest))
        .count()
}

/// Pod A (namespace `<prefix>-a`, alice's secret) pulls a private image;
/// pod B in `<prefix>-b` without a secret does not start from the cached
/// image and carries credlet's reason; the guard restarts (its records
/// must keep the image protected); pod C in `<prefix>-b` with bob's secret
/// starts without the layer being downloaded again.
fn image_guard_scenario(env: &Env, prefix: &str, repo: &str) -> Result<()> {
    let image = build_and_push_image(&env.registry, repo, "v1", ALICE)?;
    let mut cluster = env.cluster();
    let (ns_a, ns_b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    with_client(&cluster, async |client| {
        namespace(&client, &ns_a, "default").await?;
        namespace(&client, &ns_b, "default").await?;
        pull_secret(&client, &ns_a, "alice", &env.registry, ALICE).await?;
        pull_secret(&client, &ns_b, "bob", &env.registry, BOB).await?;

        create_pod(
            &client,
            &ns_a,
            image_pod("a", &image.reference, Some("alice")),
        )
        .await?;
        wait_for_phase(&client, &ns_a, "a", &["Running"], POD_TIMEOUT).await?;
        let downloads = layer_downloads(&env.registry, &image);
        ensure!(downloads == 1, "pod A pulled the layer once: {downloads}");

        create_pod(&client, &ns_b, image_pod("b", &image.reference, None)).await?;
        let deadline = Instant::now() + POD_TIMEOUT;
        let reason = loop {
            let pod = Api::<Pod>::namespaced(client.clone(), &ns_b)
                .get("b")
                .await?;
            let status = pod.status.clone().unwrap_or_default();
            ensure!(
                status.phase.as_deref() != Some("Running"),
                "pod B runs the private image without credentials"
            );
            let found = events(&client, &ns_b, "b")
                .await?
                .into_iter()
                .find(|e| e.contains("credlet: credentials of"));
            if let Some(e) = found {
                break e;
            }
            ensure!(
                Instant::now() < deadline,
                "no Event with credlet's reason for pod B: {:?}\nstatus: {}",
                events(&client, &ns_b, "b").await?,
                serde_json::to_string(&status)?
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ensure!(
            reason.contains(&format!("{ns_b}/b")),
            "names the pod: {reason}"
        );
        Ok(())
    })?;

    // A restarted guard reads its records: the image stays protected and
    // pod A's verification holds.
    cluster.restart_guard()?;
    with_client(&cluster, async |client| {
        create_pod(
            &client,
            &ns_b,
            image_pod("c", &image.reference, Some("bob")),
        )
        .await?;
        wait_for_phase(&client, &ns_b, "c", &["Running"], POD_TIMEOUT).await?;
        let again = layer_downloads(&env.registry, &image);
        ensure!(
            again == 1,
            "pod C started without downloading the layer again: {again}"
        );
        let b = Api::<Pod>::namespaced(client.clone(), &ns_b)
            .get("b")
            .await?;
        ensure!(
            b.status.and_then(|s| s.phase).as_deref() != Some("Running"),
            "pod B still does not run"
        );
        for (ns, name) in [(&ns_a, "a"), (&ns_b, "b"), (&ns_b, "c")] {
            delete_pod(&client, ns, name).await?;
        }
        Ok(())
    })
}

fn image_guard_with_the_kubelets_default_verification(env: &Env) -> Result<()> {
    image_guard_scenario(env, "guard-default", "team/app-default")
}

fn image_guard_with_the_kubelet_never_verifying(env: &Env) -> Result<()> {
    env.cluster().restart_kubelet(Some("NeverVerify"))?;
    let result = image_guard_scenario(env, "guard-never", "team/app-never");
    env.cluster().restart_kubelet(None)?;
    result
}

/// A busybox pod (`sleep`) that mounts `image` as a Kubernetes image
/// volume at `/v` and prints the image's `/hello.txt` first.
fn image_volume_pod(name: &str, image: &str, secret: Option<&str>) -> Value {
    let mut pod = json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "sh",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "cat /v/hello.txt; sleep 3600"],
                "volumeMounts": [{"name": "v", "mountPath": "/v"}],
            }],
            "volumes": [{"name": "v", "image": {"reference": image, "pullPolicy": "IfNotPresent"}}],
        },
    });
    if let Some(s) = secret {
        pod["spec"]["imagePullSecrets"] = json!([{"name": s}]);
    }
    pod
}

/// Issue 14, finding 1: a cached private image mounted as an image volume
/// (`volumes[].image`, CRI `Mount.image`, served by containerd 2) by a pod
/// without credentials. Pod A (`img-vol-a`, alice's secret) runs the
/// private image; pod B (`img-vol-b`, no secret) mounts it as a volume and
/// must not start, with credlet's reason in an Event; pod C (`img-vol-b`,
/// bob's secret) mounts it and starts, reading the image's file.
///
/// The kubelet runs with `imagePullCredentialsVerificationPolicy:
/// NeverVerify`: its own check would otherwise force a re-pull for pod B
/// (which credlet refuses), and the guard must hold on its own whatever the
/// kubelet is configured to do.
fn image_guard_refuses_image_volumes_without_credentials(env: &Env) -> Result<()> {
    env.cluster().restart_kubelet(Some("NeverVerify"))?;
    let result = image_volume_scenario(env);
    env.cluster().restart_kubelet(None)?;
    result
}

/// The id of the pod sandbox the kubelet ran for the pod with `uid`.
async fn pod_sandbox(containerd: &std::path::Path, uid: &str) -> Result<String> {
    use credlet_test_util::cri::v1::{ListPodSandboxRequest, PodSandboxFilter};
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let mut direct = Kubelet::connect(containerd).await;
        let items = direct
            .rt
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [("io.kubernetes.pod.uid".to_owned(), uid.to_owned())].into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        if let Some(sandbox) = items.into_iter().next() {
            return Ok(sandbox.id);
        }
        ensure!(Instant::now() < deadline, "no sandbox for pod {uid}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `CreateContainer` of busybox in `sandbox_id` with `image_id` mounted at
/// `/v` as an image volume (CRI `Mount.image`), as the kubelet sends it.
async fn create_with_image_volume(
    cri: &mut Kubelet,
    pod: &TestPod,
    sandbox_id: &str,
    image_id: &str,
    user_image: &str,
) -> Result<String, tonic::Status> {
    use credlet_test_util::cri::v1::{
        ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, Mount,
    };
    Ok(cri
        .rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "direct".into(),
                    attempt: 0,
                }),
                image: Some(credlet_test_util::kubelet::spec(BUSYBOX_IMAGE)),
                command: vec!["sleep".into(), "3600".into()],
                mounts: vec![Mount {
                    container_path: "/v".into(),
                    readonly: true,
                    image: Some(ImageSpec {
                        image: image_id.into(),
                        user_specified_image: user_image.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            sandbox_config: Some(pod.sandbox_config()),
        })
        .await?
        .into_inner()
        .container_id)
}

fn image_volume_scenario(env: &Env) -> Result<()> {
    let image = build_and_push_image(&env.registry, "team/app-volume", "v1", ALICE)?;
    let cluster = env.cluster();
    let guard_socket = cluster.guard_socket().context("the image guard runs")?;
    let containerd_socket = cluster.containerd_socket();
    let (ns_a, ns_b) = ("img-vol-a", "img-vol-b");
    with_client(&cluster, async |client| {
        namespace(&client, ns_a, "default").await?;
        namespace(&client, ns_b, "default").await?;
        pull_secret(&client, ns_a, "alice", &env.registry, ALICE).await?;
        pull_secret(&client, ns_b, "bob", &env.registry, BOB).await?;

        create_pod(
            &client,
            ns_a,
            image_pod("a", &image.reference, Some("alice")),
        )
        .await?;
        wait_for_phase(&client, ns_a, "a", &["Running"], POD_TIMEOUT).await?;

        create_pod(&client, ns_b, image_volume_pod("b", &image.reference, None)).await?;
        let deadline = Instant::now() + POD_TIMEOUT;
        let reason = loop {
            let pod = Api::<Pod>::namespaced(client.clone(), ns_b)
                .get("b")
                .await?;
            let status = pod.status.clone().unwrap_or_default();
            ensure!(
                status.phase.as_deref() != Some("Running"),
                "pod B runs with the private image mounted as a volume, without credentials; events: {:?}",
                events(&client, ns_b, "b").await?
            );
            let found = events(&client, ns_b, "b")
                .await?
                .into_iter()
                .find(|e| e.contains("credlet: "));
            if let Some(e) = found {
                break e;
            }
            ensure!(
                Instant::now() < deadline,
                "no Event with credlet's reason for pod B: {:?}\nstatus: {}",
                events(&client, ns_b, "b").await?,
                serde_json::to_string(&status)?
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        eprintln!("pod B: {reason}");
        ensure!(
            reason.contains(&format!("{ns_b}/b")),
            "names the pod: {reason}"
        );

        // A CRI caller that skips ImageStatus and PullImage and creates a
        // container in pod B's sandbox with the image mounted (CRI
        // `Mount.image`) meets the last gate.
        let b = Api::<Pod>::namespaced(client.clone(), ns_b)
            .get("b")
            .await?;
        let b = TestPod {
            namespace: ns_b.into(),
            name: "b".into(),
            uid: b.metadata.uid.context("pod B's uid")?,
            auth: None,
        };
        let sandbox_b = pod_sandbox(&containerd_socket, &b.uid).await?;
        let mut cri = Kubelet::connect(&guard_socket).await;
        let refused = create_with_image_volume(
            &mut cri,
            &b,
            &sandbox_b,
            &image.config_digest,
            &image.reference,
        )
        .await;
        match refused {
            Err(status) if status.code() == tonic::Code::FailedPrecondition => ensure!(
                status.message().contains("img-vol-b/b")
                    && status.message().contains("image volume at /v"),
                "credlet's refusal names the pod and the mount: {status:?}"
            ),
            other => bail!(
                "pod B's container with the image volume was not refused by credlet: {other:?}"
            ),
        }

        create_pod(
            &client,
            ns_b,
            image_volume_pod("c", &image.reference, Some("bob")),
        )
        .await?;
        wait_for_phase(&client, ns_b, "c", &["Running"], POD_TIMEOUT).await?;
        // Pod C, verified, passes the same gate.
        let c = Api::<Pod>::namespaced(client.clone(), ns_b)
            .get("c")
            .await?;
        let c = TestPod {
            namespace: ns_b.into(),
            name: "c".into(),
            uid: c.metadata.uid.context("pod C's uid")?,
            auth: None,
        };
        let sandbox_c = pod_sandbox(&containerd_socket, &c.uid).await?;
        match create_with_image_volume(
            &mut cri,
            &c,
            &sandbox_c,
            &image.config_digest,
            &image.reference,
        )
        .await
        {
            Ok(id) => {
                eprintln!("pod C: a container with the image volume created by containerd ({id})");
                cri.remove_container(&id).await;
            }
            Err(status) => {
                eprintln!("pod C: containerd refused the direct container: {status:?}");
                ensure!(
                    !status.message().contains("credlet"),
                    "pod C's image volume refused by credlet: {status:?}"
                );
            }
        }
        let deadline = Instant::now() + POD_TIMEOUT;
        loop {
            let log = logs(&client, ns_b, "c").await.unwrap_or_default();
            if log.contains("credlet test image") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "pod C does not read the image volume: {log:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let downloads = layer_downloads(&env.registry, &image);
        ensure!(
            downloads == 1,
            "the layer was downloaded once, by pod A: {downloads}"
        );
        let b = Api::<Pod>::namespaced(client.clone(), ns_b)
            .get("b")
            .await?;
        ensure!(
            b.status.and_then(|s| s.phase).as_deref() != Some("Running"),
            "pod B still does not run"
        );
        for (ns, name) in [(ns_a, "a"), (ns_b, "b"), (ns_b, "c")] {
            delete_pod(&client, ns, name).await?;
        }
        Ok(())
    })
}

/// `apiserver_request_total` for TokenReview creations.
fn token_reviews(cluster: &Cluster) -> Result<u64> {
    let out = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"tokenreviews\"")
                && l.contains("verb=\"POST\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn ca_verifies_tokens_offline_against_the_issuers_keys(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    let reviews_before = token_reviews(&cluster)?;
    ensure!(reviews_before > 0, "the CA reviewed tokens so far");
    cluster.kubectl(&[
        "-n",
        CREDLET_NAMESPACE,
        "patch",
        "deployment/credlet-ca",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--token-verification=jwks"}]"#,
    ])?;
    cluster.wait_for_credlet()?;
    let reviews_after_rollout = token_reviews(&cluster)?;
    let result = with_client(&cluster, async |client| {
        let ns = "jwks";
        namespace(&client, ns, "offline").await?;
        create_pod(
            &client,
            ns,
            probe_pod("offline", "offline", json!({"credlet.io/duration": "30s"})),
        )
        .await?;
        let first = wait_for_report(&client, ns, "offline", POD_TIMEOUT, "a certificate", |r| {
            r.get("serial").is_some()
        })
        .await?;
        ensure!(
            first["uris"] == json!(["spiffe://cluster.local/ns/jwks/sa/offline"])
                && first["key_match"] == true,
            "{first}"
        );
        // A renewal too: the agent's own token and the pod's, verified
        // against the issuer's keys.
        wait_for_report(
            &client,
            ns,
            "offline",
            Duration::from_secs(60),
            "a renewal",
            |r| r.get("serial").is_some() && r["serial"] != first["serial"],
        )
        .await?;
        delete_pod(&client, ns, "offline").await
    });
    let reviews_after = token_reviews(&cluster)?;
    cluster.kubectl(&[
        "-n",
        CREDLET_NAMESPACE,
        "rollout",
        "undo",
        "deployment/credlet-ca",
    ])?;
    cluster.wait_for_credlet()?;
    result?;
    ensure!(
        reviews_after == reviews_after_rollout,
        "the CA sent TokenReviews while verifying offline: {reviews_after_rollout} -> {reviews_after}"
    );
    Ok(())
}

fn agent_killed_volumes_stay_valid_and_rotation_resumes(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    with_client(&cluster, async |client| {
        let ns = "agent-restart";
        namespace(&client, ns, "default").await?;
        create_pod(
            &client,
            ns,
            probe_pod("steady", "default", json!({"credlet.io/duration": "40s"})),
        )
        .await?;
        let first = wait_for_report(&client, ns, "steady", POD_TIMEOUT, "a certificate", |r| {
            r.get("serial").is_some()
        })
        .await?;
        let agents = Api::<Pod>::namespaced(client.clone(), CREDLET_NAMESPACE);
        let selector = ListParams::default().labels("app.kubernetes.io/name=credlet-agent");
        let old: Vec<String> = agents
            .list(&selector)
            .await?
            .items
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        for name in &old {
            agents
                .delete(name, &DeleteParams::default().grace_period(0))
                .await?;
        }
        let killed_at = Instant::now();
        // The DaemonSet starts a new agent; the pod's files stay valid all
        // along, and the next renewal comes from the new agent.
        let deadline = Instant::now() + POD_TIMEOUT;
        loop {
            let now: Vec<Pod> = agents.list(&selector).await?.items;
            let fresh = now.iter().any(|p| {
                !old.contains(p.metadata.name.as_ref().unwrap_or(&String::new()))
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            if fresh {
                break;
            }
            ensure!(Instant::now() < deadline, "no new agent became ready");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let renewed = wait_for_report(
            &client,
            ns,
            "steady",
            Duration::from_secs(90),
            "a renewal after the restart",
            |r| r.get("serial").is_some() && r["serial"] != first["serial"],
        )
        .await?;
        ensure!(
            renewed["key_match"] == true && renewed["chain_ok"] == true,
            "{renewed}"
        );
        let reports = probe_reports(&client, ns, "steady").await?;
        ensure!(
            !reports.iter().any(|r| r.get("error").is_some()),
            "the pod saw broken files while the agent was down: {reports:?}"
        );
        eprintln!(
            "agent restart: renewed {:.1?} after the kill",
            killed_at.elapsed()
        );
        delete_pod(&client, ns, "steady").await
    })
}

fn ca_key_rotated_through_its_secret_reaches_volumes_and_bundle(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    let dir = cluster.dir().join("rotation");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = credlet_test_util::cluster::new_credlet_root("credlet root CA 2")?;
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_file, &cert)?;
    std::fs::write(&key_file, &key)?;
    with_client(&cluster, async |client| {
        let ns = "ca-rotation";
        namespace(&client, ns, "default").await?;
        create_pod(
            &client,
            ns,
            probe_pod("rolled", "default", json!({"credlet.io/duration": "30s"})),
        )
        .await?;
        wait_for_report(&client, ns, "rolled", POD_TIMEOUT, "a certificate", |r| {
            r.get("serial").is_some()
        })
        .await?;
        Ok(())
    })?;
    let secret = cluster.kubectl(&[
        "-n",
        CREDLET_NAMESPACE,
        "create",
        "secret",
        "generic",
        "credlet-ca-key",
        &format!("--from-file=tls.crt={}", cert_file.display()),
        &format!("--from-file=tls.key={}", key_file.display()),
        "--dry-run=client",
        "-o",
        "json",
    ])?;
    let _ = std::fs::remove_file(&key_file);
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &String::from_utf8_lossy(&secret.stdout),
    )?;
    let old_root = env.credlet.ca_pem.trim().to_string();
    let new_root = cert.trim().to_string();
    with_client(&cluster, async |client| {
        let ns = "ca-rotation";
        // The volume's bundle carries both roots, and its next certificate
        // chains to the bundle.
        let both = wait_for_report(
            &client,
            ns,
            "rolled",
            Duration::from_secs(180),
            "both roots",
            |r| r["bundle_len"] == 2,
        )
        .await?;
        ensure!(both["chain_ok"] == true, "{both}");
        delete_pod(&client, ns, "rolled").await
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cluster.kubectl(&["get", "clustertrustbundles", "-o", "json"])?;
        let list: Value = serde_json::from_slice(&out.stdout)?;
        let ours: Vec<String> = list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|b| b["spec"]["signerName"] == SIGNER)
            .filter_map(|b| b["spec"]["trustBundle"].as_str().map(str::to_string))
            .collect();
        if ours.len() == 1 && ours[0].contains(&old_root) && ours[0].contains(&new_root) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the ClusterTrustBundle does not carry both roots: {ours:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The key types a `podCertificate` projection may ask for (the API
/// server refuses others).
const KEY_TYPES: [&str; 6] = [
    "RSA3072",
    "RSA4096",
    "ECDSAP256",
    "ECDSAP384",
    "ECDSAP521",
    "ED25519",
];

/// The request's public key (SPKI DER): `pkixPublicKey` (1.35), or the
/// key of the `stubPKCS10Request` (1.36+).
fn requested_key(request: &Value) -> Result<Vec<u8>> {
    use base64::Engine;
    use x509_parser::prelude::FromDer;
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(k) = request["spec"]["pkixPublicKey"].as_str() {
        return Ok(b64.decode(k)?);
    }
    let stub = b64.decode(
        request["spec"]["stubPKCS10Request"]
            .as_str()
            .context("neither pkixPublicKey nor stubPKCS10Request")?,
    )?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&stub)
        .map_err(|e| anyhow::anyhow!("stub CSR: {e}"))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

fn rfc3339(v: &Value) -> Result<i64> {
    let t: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time =
        serde_json::from_value(v.clone())?;
    Ok(t.0.as_second())
}

/// A pod with one `podCertificate` volume per key type: the kubelet makes
/// the keys and the requests, credlet's signer answers each, and the API
/// server checks the answers. Each status is checked against the request:
/// one `Issued` condition, the leaf certifies the requested key and the
/// pod's SPIFFE ID, `notBefore`/`notAfter` are the leaf's, `beginRefreshAt`
/// lies 10 minutes inside them, the lifetime respects
/// `maxExpirationSeconds`, and the chain verifies against the published
/// ClusterTrustBundle.
fn pod_certificates_for_every_key_type(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    let ns = "key-types";
    with_client(&cluster, async |client| {
        namespace(&client, ns, "keys").await?;
        let volumes: Vec<Value> = KEY_TYPES
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                json!({"name": format!("k{i}"), "projected": {"sources": [{"podCertificate": {
                    "signerName": SIGNER,
                    "keyType": kind,
                    "maxExpirationSeconds": 3600 * (i + 2),
                    "credentialBundlePath": "credential.pem",
                }}]}})
            })
            .collect();
        let mounts: Vec<Value> = (0..KEY_TYPES.len())
            .map(|i| json!({"name": format!("k{i}"), "mountPath": format!("/k{i}")}))
            .collect();
        create_pod(
            &client,
            ns,
            json!({
                "metadata": {"name": "keys"},
                "spec": {
                    "serviceAccountName": "keys",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "sh",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "3600"],
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            }),
        )
        .await?;
        // The kubelet starts the pod only once every request is answered.
        wait_for_phase(&client, ns, "keys", &["Running"], POD_TIMEOUT).await?;
        Ok(())
    })?;
    let bundle = {
        let out = cluster.kubectl(&["get", "clustertrustbundles", "-o", "json"])?;
        let list: Value = serde_json::from_slice(&out.stdout)?;
        list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .find(|b| b["spec"]["signerName"] == SIGNER)
            .and_then(|b| b["spec"]["trustBundle"].as_str().map(str::to_string))
            .context("credlet's ClusterTrustBundle")?
    };
    let requests = pod_certificate_requests(&cluster, ns)?;
    ensure!(
        requests.len() == KEY_TYPES.len(),
        "{} requests",
        requests.len()
    );
    for (i, kind) in KEY_TYPES.into_iter().enumerate() {
        // Requests carry no key type: each volume asked for its own
        // lifetime, and the key itself tells its type.
        let r = requests
            .iter()
            .find(|r| r["spec"]["maxExpirationSeconds"] == 3600 * (i + 2))
            .with_context(|| format!("no {kind} request"))?;
        let requested = requested_key(r)?;
        ensure!(
            key_type(&requested)? == kind,
            "{kind}: the kubelet made another key type"
        );
        let conditions = r["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            conditions.len() == 1
                && conditions[0]["type"] == "Issued"
                && conditions[0]["status"] == "True",
            "{kind}: {conditions:?}"
        );
        let chain = r["status"]["certificateChain"].as_str().context("chain")?;
        use rustls::pki_types::pem::PemObject;
        let leaf_der = rustls::pki_types::CertificateDer::from_pem_slice(chain.as_bytes())
            .map_err(|e| anyhow::anyhow!("{kind} chain: {e}"))?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der)
            .map_err(|e| anyhow::anyhow!("{kind} leaf: {e}"))?;
        ensure!(
            leaf.tbs_certificate.subject_pki.raw == requested.as_slice(),
            "{kind}: the leaf does not certify the requested key"
        );
        let uris: Vec<String> = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            uris == ["spiffe://cluster.local/ns/key-types/sa/keys"],
            "{kind}: {uris:?}"
        );
        let (nb, na) = (
            leaf.validity().not_before.timestamp(),
            leaf.validity().not_after.timestamp(),
        );
        ensure!(
            rfc3339(&r["status"]["notBefore"])? == nb,
            "{kind}: notBefore"
        );
        ensure!(rfc3339(&r["status"]["notAfter"])? == na, "{kind}: notAfter");
        let refresh = rfc3339(&r["status"]["beginRefreshAt"])?;
        ensure!(
            refresh >= nb + 600 && refresh <= na - 600,
            "{kind}: beginRefreshAt {refresh} outside [{nb}+10min, {na}-10min]"
        );
        let max = r["spec"]["maxExpirationSeconds"].as_i64().context("max")?;
        ensure!(
            na - nb >= 3600 && na - nb <= max,
            "{kind}: lifetime {} for at most {max}",
            na - nb
        );
        verify_chain(chain, &bundle).with_context(|| format!("{kind} chain"))?;
    }
    with_client(&cluster, async |client| {
        delete_pod(&client, ns, "keys").await
    })
}

/// The `podCertificate` key type of a public key (SPKI DER).
fn key_type(spki: &[u8]) -> Result<String> {
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| anyhow::anyhow!("SPKI: {e}"))?;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    Ok(
        match (
            spki.algorithm.algorithm.to_id_string().as_str(),
            curve.as_deref(),
        ) {
            ("1.2.840.113549.1.1.1", _) => match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => format!("RSA{}", rsa.key_size()),
                _ => bail!("unparsable RSA key"),
            },
            ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "ECDSAP256".into(),
            ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "ECDSAP384".into(),
            ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => "ECDSAP521".into(),
            ("1.3.101.112", _) => "ED25519".into(),
            (alg, curve) => bail!("unknown key algorithm {alg} {curve:?}"),
        },
    )
}

/// Verifies `chain_pem` (leaf first) as a client certificate against the
/// roots in `bundle_pem`.
fn verify_chain(chain_pem: &str, bundle_pem: &str) -> Result<()> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let chain =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(root?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    verifier.verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())?;
    Ok(())
}

/// credlet's objects anywhere in the cluster (by the part-of label, plus
/// the cluster-scoped ones by name).
fn credlet_objects(cluster: &Cluster) -> Result<Vec<String>> {
    let out = cluster.kubectl(&[
        "get",
        "daemonsets,deployments,services,serviceaccounts,roles,rolebindings,networkpolicies,poddisruptionbudgets,clusterroles,clusterrolebindings,csidrivers",
        "--all-namespaces",
        "-l",
        "app.kubernetes.io/part-of=credlet",
        "-o",
        "name",
    ])?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    for (kind, name) in [
        ("csidriver", "csi.credlet.io"),
        ("clusterrole", "credlet-ca"),
        ("clusterrole", "credlet-signer"),
    ] {
        if cluster.kubectl(&["get", kind, name]).is_ok() && !names.iter().any(|n| n.ends_with(name))
        {
            names.push(format!("{kind}/{name}"));
        }
    }
    Ok(names)
}

/// The Helm chart on the real cluster: the kustomize install removed, the
/// chart installed with the node's adjustments as values, a pod gets a
/// certificate through it, and `helm uninstall` leaves none of credlet's
/// objects behind.
fn helm_chart_installs_credlet_and_uninstalls_cleanly(env: &Env) -> Result<()> {
    let cluster = env.cluster();
    cluster.uninstall_credlet(&env.credlet)?;
    ensure!(
        credlet_objects(&cluster)?.is_empty(),
        "the kustomize install left objects: {:?}",
        credlet_objects(&cluster)?
    );
    cluster.install_credlet_helm(&CredletOptions {
        binary: std::path::PathBuf::from(env!("CARGO_BIN_EXE_credlet-under-test")),
        ca_args: vec!["--min-duration=20s".into()],
    })?;
    let status = cluster.helm(&["status", "credlet", "--namespace", CREDLET_NAMESPACE])?;
    ensure!(
        String::from_utf8_lossy(&status.stdout).contains("STATUS: deployed"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    with_client(&cluster, async |client| {
        let ns = "helm-installed";
        namespace(&client, ns, "app").await?;
        create_pod(
            &client,
            ns,
            probe_pod(
                "app",
                "app",
                json!({"credlet.io/dns-names": "$POD_NAME.$POD_NAMESPACE.svc"}),
            ),
        )
        .await?;
        let report = wait_for_report(&client, ns, "app", POD_TIMEOUT, "a certificate", |r| {
            r.get("serial").is_some()
        })
        .await?;
        ensure!(
            report["key_match"] == true
                && report["chain_ok"] == true
                && report["uris"] == json!(["spiffe://cluster.local/ns/helm-installed/sa/app"])
                && report["dns"] == json!(["app.helm-installed.svc"]),
            "{report}"
        );
        delete_pod(&client, ns, "app").await
    })?;
    cluster.helm(&[
        "uninstall",
        "credlet",
        "--namespace",
        CREDLET_NAMESPACE,
        "--wait",
    ])?;
    let left = credlet_objects(&cluster)?;
    ensure!(left.is_empty(), "helm uninstall left {left:?}");
    Ok(())
}
