//! `RegistryVerifier` reaching registries the way the container runtime
//! does: containerd `hosts.toml` mirrors (the same file given to a real
//! containerd, which must pull through the same mirror), a plain-HTTP
//! registry, an HTTP `CONNECT` proxy, and a redirect to another host.
//! Real CNCF distribution registries on loopback; host names under
//! `.credlet.test` resolve nowhere, so every request goes where the
//! configuration says. Needs `test-util/install-deps.sh` (root).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use credlet_imageguard::credential::Credential;
use credlet_imageguard::egress::ProxyEnv;
use credlet_imageguard::reference::ImageRef;
use credlet_imageguard::registry::{
    Access, CheckReport, RegistryVerifier, RegistryVerifierConfig, VerifyError,
};
use credlet_test_util::cri::v1::image_service_client::ImageServiceClient;
use credlet_test_util::cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use credlet_test_util::{
    CLOSED_SERVER, Containerd, Registry, TEST_SERVER_NAME, TestCa, build_and_push_image,
    unix_channel,
};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALICE: (&str, &str) = ("alice", "pw-alice");

fn cred(user: &str, pass: &str) -> Credential {
    Credential::basic(user, pass).expect("credential")
}

fn verifier(config_dir: Option<&Path>, root_pem: &str, proxy: ProxyEnv) -> RegistryVerifier {
    RegistryVerifier::new(RegistryVerifierConfig {
        extra_root_pems: vec![root_pem.to_string()],
        use_system_roots: false,
        timeout: Duration::from_secs(10),
        registry_config_dirs: config_dir.map(Path::to_path_buf).into_iter().collect(),
        proxy,
        ..RegistryVerifierConfig::default()
    })
    .expect("verifier")
}

fn write_hosts(root: &Path, host: &str, text: &str) {
    let dir = root.join(host);
    std::fs::create_dir_all(&dir).expect("host dir");
    std::fs::write(dir.join("hosts.toml"), text).expect("hosts.toml");
}

fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn denial(report: &CheckReport) -> &str {
    report
        .access
        .denial()
        .unwrap_or_else(|| panic!("expected a denial, got {report:?}"))
}

/// HEADs of `digest`'s manifest in the registry's access log, with status.
fn manifest_heads(registry: &Registry, digest: &str) -> Vec<(String, u16)> {
    registry
        .access_log()
        .into_iter()
        .filter(|e| e.method == "HEAD" && e.path.contains(&format!("/manifests/{digest}")))
        .map(|e| (e.path, e.status))
        .collect()
}

/// CRI PullImage on containerd with a username/password.
async fn cri_pull(
    containerd: &Containerd,
    image: &str,
    user: &str,
    pass: &str,
) -> Result<String, String> {
    let channel = unix_channel(containerd.cri_socket())
        .await
        .map_err(|e| e.to_string())?;
    ImageServiceClient::new(channel)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: user.to_string(),
                password: pass.to_string(),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
        .map_err(|s| s.message().to_string())
}

/// One hosts.toml, two readers: containerd pulls `upstream.credlet.test`
/// through the second mirror (the first is down, the server a closed
/// port), and the guard's check goes to the same mirror, with the same
/// verdict for the same credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_chain_matches_containerd() {
    const UPSTREAM: &str = "upstream.credlet.test";
    let registry = Registry::start_basic_auth(&[ALICE]).expect("registry");
    let pushed = build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push");
    let containerd = Containerd::start().expect("containerd");
    let certs_d = containerd.dir().join("certs.d");
    let ca = registry.ca_pem_path();
    write_hosts(
        &certs_d,
        UPSTREAM,
        &format!(
            "server = \"{CLOSED_SERVER}\"\n\n\
             [host.\"https://{down}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n\n\
             [host.\"https://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
            down = closed_port(),
            mirror = registry.host(),
            ca = ca.display(),
        ),
    );
    // The guard's own roots do not include the registry's CA: only the
    // hosts.toml names it.
    let unrelated = TestCa::new("unrelated CA").expect("CA");
    let v = verifier(Some(&certs_d), unrelated.cert_pem(), ProxyEnv::none());
    let image = ImageRef::parse(&format!("{UPSTREAM}/team/app:v1")).expect("image");
    let reference = format!("{UPSTREAM}/team/app:v1");

    let pushed_log = registry.access_log().len();

    // Wrong password: both refuse.
    cri_pull(&containerd, &reference, "alice", "wrong")
        .await
        .expect_err("containerd pulled with a wrong password");
    let r = v
        .verify(&image, &pushed.digest, Some(&cred("alice", "wrong")))
        .await
        .expect("check");
    let why = denial(&r);
    assert!(why.contains("rejected the credentials"), "{why}");
    assert!(
        why.contains(&format!(
            "[mirror https://{}; also asked: mirror https://",
            registry.host()
        )),
        "{why}"
    );
    assert!(why.contains(&format!("server {CLOSED_SERVER}")), "{why}");

    // Right password: both succeed, through the second mirror.
    cri_pull(&containerd, &reference, ALICE.0, ALICE.1)
        .await
        .expect("containerd pull through the mirror");
    let r = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect("check");
    assert_eq!(r.access, Access::Granted, "{r:?}");
    assert_eq!(
        r.answered_by,
        Some(format!("mirror https://{}", registry.host()))
    );
    // Both asked this mirror, for the upstream's name (containerd's `ns`):
    // containerd resolving the tag, the guard the digest.
    let asked: Vec<_> = registry.access_log()[pushed_log..]
        .iter()
        .filter(|e| e.path.contains("/manifests/"))
        .cloned()
        .collect();
    assert!(
        asked
            .iter()
            .all(|e| e.path.ends_with(&format!("?ns={UPSTREAM}"))),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .any(|e| e.path.starts_with("/v2/team/app/manifests/v1?") && e.status == 200),
        "containerd resolved the tag at the mirror: {asked:?}"
    );
    assert!(
        asked.iter().any(|e| e.method == "HEAD"
            && e.path
                .starts_with(&format!("/v2/team/app/manifests/{}?", pushed.digest))
            && e.status == 200),
        "the guard's check reached the mirror: {asked:?}"
    );
}

/// A plain-HTTP registry, named as an `http://` server in hosts.toml; and
/// an `http://` host with TLS settings, which containerd (and the guard)
/// first tries with HTTPS and falls back from when it answers in HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_registry_from_hosts_toml() {
    let registry = Registry::start_basic_auth_plain_http(&[ALICE]).expect("registry");
    let pushed = build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push");
    let root = tempfile::tempdir().expect("tempdir");
    write_hosts(
        root.path(),
        "plain.credlet.test",
        &format!("server = \"{}\"\n", registry.url()),
    );
    write_hosts(
        root.path(),
        "tls-first.credlet.test:5000",
        &format!(
            "[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n",
            registry.url()
        ),
    );
    let v = verifier(Some(root.path()), registry.ca_pem(), ProxyEnv::none());

    let image = ImageRef::parse("plain.credlet.test/team/app").expect("image");
    let r = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect("check");
    assert_eq!(r.access, Access::Granted, "{r:?}");
    assert_eq!(r.answered_by, Some(format!("server {}", registry.url())));
    let r = v
        .verify(&image, &pushed.digest, Some(&cred("alice", "wrong")))
        .await
        .expect("check");
    assert!(denial(&r).contains("rejected the credentials"), "{r:?}");
    let r = v.verify(&image, &pushed.digest, None).await.expect("check");
    assert!(denial(&r).contains("requires authentication"), "{r:?}");

    let image = ImageRef::parse("tls-first.credlet.test:5000/team/app").expect("image");
    let r = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect("check");
    assert_eq!(r.access, Access::Granted, "{r:?}");

    // Without a hosts.toml the registry is HTTPS, which it does not speak.
    let image = ImageRef::parse(&format!("{}/team/app", registry.host())).expect("image");
    let e = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect_err("HTTPS to a plain-HTTP registry");
    assert!(matches!(e, VerifyError::Tls { .. }), "{e}");
}

/// What the test proxy saw: each CONNECT's target and whether its
/// Proxy-Authorization was right.
type Connects = Arc<Mutex<Vec<(String, bool)>>>;

/// A tiny HTTP CONNECT proxy on loopback: `TEST_SERVER_NAME:443` is
/// tunnelled to `registry`; anything else gets 502; a wrong or missing
/// `Proxy-Authorization` (Basic pu:pp) gets 407.
async fn connect_proxy(registry: SocketAddr) -> (SocketAddr, Connects) {
    use base64::Engine;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connects: Connects = Arc::default();
    let seen = Arc::clone(&connects);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("pu:pp")
    );
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            let expected = expected.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let target = text
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("")
                    .to_string();
                let authorized = text.lines().any(|l| {
                    l.split_once(':').is_some_and(|(name, value)| {
                        name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == expected
                    })
                });
                seen.lock().unwrap().push((target.clone(), authorized));
                if !authorized {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\n\r\n")
                        .await;
                    return;
                }
                if target != format!("{TEST_SERVER_NAME}:443") {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(registry).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, connects)
}

/// With HTTPS_PROXY set, the check of a registry the node reaches only
/// through the proxy goes through a CONNECT tunnel (TLS end to end, the
/// registry's certificate checked for its name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_through_a_connect_proxy() {
    let registry = Registry::start_basic_auth(&[ALICE]).expect("registry");
    let pushed = build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push");
    let (proxy, connects) = connect_proxy(registry.addr()).await;
    let env = |url: String| {
        ProxyEnv::from_lookup(move |name| (name == "HTTPS_PROXY").then(|| url.clone()))
            .expect("proxy env")
    };
    let v = verifier(
        None,
        registry.ca_pem(),
        env(format!("http://pu:pp@{proxy}")),
    );
    let image = ImageRef::parse(&format!("{TEST_SERVER_NAME}/team/app")).expect("image");

    let r = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect("check through the proxy");
    assert_eq!(r.access, Access::Granted, "{r:?}");
    let r = v
        .verify(&image, &pushed.digest, Some(&cred("alice", "wrong")))
        .await
        .expect("check through the proxy");
    assert!(denial(&r).contains("rejected the credentials"), "{r:?}");
    let seen = connects.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|(target, ok)| *target == format!("{TEST_SERVER_NAME}:443") && *ok),
        "{seen:?}"
    );
    // The registry saw the checks (through the tunnel).
    assert!(!manifest_heads(&registry, &pushed.digest).is_empty());

    // The proxy refusing is the check failing, with the proxy's answer.
    let v = verifier(None, registry.ca_pem(), env(format!("http://{proxy}")));
    let e = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect_err("407 from the proxy");
    assert!(
        matches!(e, VerifyError::Unreachable { .. }) && e.to_string().contains("407"),
        "{e}"
    );
}

/// A registry front that redirects manifest requests to another host (as
/// registries do to blob storage): the check follows, without the pod's
/// credentials, and the other host — a real registry that would accept
/// them — refuses the bare request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_another_host_gets_no_credentials() {
    use base64::Engine;
    let registry = Registry::start_basic_auth(&[ALICE]).expect("registry");
    let pushed = build_and_push_image(&registry, "team/app", "v1", ALICE).expect("push");
    let target = format!(
        "https://{}/v2/team/app/manifests/{}",
        registry.host(),
        pushed.digest
    );
    let alice = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ALICE.0, ALICE.1))
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = listener.local_addr().expect("addr");
    let authorized_at_front = Arc::new(Mutex::new(0usize));
    let count = Arc::clone(&authorized_at_front);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (target, alice, count) = (target.clone(), alice.clone(), Arc::clone(&count));
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let authorized = req
                        .headers()
                        .get("authorization")
                        .is_some_and(|v| v.as_bytes() == alice.as_bytes());
                    let response = if authorized {
                        *count.lock().unwrap() += 1;
                        Response::builder()
                            .status(307)
                            .header("location", target.as_str())
                            .body(Full::new(Bytes::new()))
                    } else {
                        Response::builder()
                            .status(401)
                            .header("www-authenticate", "Basic realm=\"front\"")
                            .body(Full::new(Bytes::new()))
                    };
                    async move { Ok::<_, Infallible>(response.expect("response")) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let root = tempfile::tempdir().expect("tempdir");
    write_hosts(
        root.path(),
        "front.credlet.test",
        &format!("server = \"http://{front}\"\n"),
    );
    let v = verifier(Some(root.path()), registry.ca_pem(), ProxyEnv::none());
    let image = ImageRef::parse("front.credlet.test/team/app").expect("image");
    let before = manifest_heads(&registry, &pushed.digest).len();

    let r = v
        .verify(&image, &pushed.digest, Some(&cred(ALICE.0, ALICE.1)))
        .await
        .expect("check");
    let why = denial(&r);
    assert!(
        why.contains(&format!(
            "to https://{}, which asks for authentication",
            registry.host()
        )),
        "{why}"
    );
    assert!(why.contains("credentials are only ever sent to"), "{why}");
    assert_eq!(*authorized_at_front.lock().unwrap(), 1);
    // The registry got the redirected HEAD, bare: 401 (with alice's
    // credentials it would have answered 200).
    let heads = manifest_heads(&registry, &pushed.digest);
    assert_eq!(heads.len(), before + 1, "{heads:?}");
    assert_eq!(heads.last().map(|(_, s)| *s), Some(401), "{heads:?}");
}
