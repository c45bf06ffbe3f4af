//! `RegistryVerifier` against real CNCF distribution registries (htpasswd
//! and token auth) started by `credlet-test-util`, with images pushed by
//! skopeo. Needs `test-util/install-deps.sh` (root).
//!
//! Run with `--nocapture` to see the measured cost of one check.

use std::time::{Duration, Instant};

use credlet_imageguard::credential::Credential;
use credlet_imageguard::reference::ImageRef;
use credlet_imageguard::registry::{
    Access, CheckReport, RegistryVerifier, RegistryVerifierConfig, Verifier, VerifyError,
};
use credlet_proto::cri::AuthConfig;
use credlet_test_util::{ANYONE, Grant, PushedImage, Registry, build_and_push_image};

const UNKNOWN: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn verifier(registry: &Registry) -> RegistryVerifier {
    RegistryVerifier::new(RegistryVerifierConfig {
        extra_root_pems: vec![registry.ca_pem().to_string()],
        // The test CA is enough; CI images may lack a system store.
        use_system_roots: false,
        timeout: Duration::from_secs(10),
        ..RegistryVerifierConfig::default()
    })
    .expect("verifier")
}

fn cred(user: &str, pass: &str) -> Credential {
    Credential::basic(user, pass).expect("credential")
}

/// What the kubelet sends: docker-config `auth` only.
fn cred_from_auth_field(user: &str, pass: &str) -> Credential {
    use base64::Engine;
    let auth = AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")),
        ..AuthConfig::default()
    };
    Credential::from_auth_config(&auth)
        .expect("auth config")
        .expect("not anonymous")
}

fn image(pushed: &PushedImage) -> ImageRef {
    ImageRef::parse(&pushed.reference).expect("reference")
}

fn reason(report: &CheckReport) -> &str {
    report
        .access
        .denial()
        .unwrap_or_else(|| panic!("expected a denial, got {report:?}"))
}

fn manifest_heads(registry: &Registry) -> usize {
    registry
        .access_log()
        .iter()
        .filter(|e| e.method == "HEAD" && e.path.contains("/manifests/"))
        .count()
}

fn blob_gets(registry: &Registry) -> usize {
    registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
        .count()
}

/// Times `n` checks; returns (p50, p99) in µs.
async fn time_checks(
    v: &RegistryVerifier,
    img: &ImageRef,
    digest: &str,
    c: Option<&Credential>,
    n: usize,
) -> (u128, u128) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let report = v.verify(img, digest, c).await.expect("check");
        samples.push(start.elapsed().as_micros());
        assert_eq!(report.access, Access::Granted);
    }
    samples.sort_unstable();
    (samples[n / 2], samples[(n * 99 / 100).min(n - 1)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry() {
    let mut registry =
        Registry::start_basic_auth(&[("alice", "pw-alice"), ("bob", "pw-bob")]).expect("registry");
    let pushed =
        build_and_push_image(&registry, "team/app", "v1", ("alice", "pw-alice")).expect("push");
    let img = image(&pushed);
    let v = verifier(&registry);
    let heads_before = manifest_heads(&registry);
    let blobs_before = blob_gets(&registry);

    // Right credentials: anonymous HEAD (401 Basic), then HEAD with Basic.
    let start = Instant::now();
    let r = v
        .verify(&img, &pushed.digest, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check");
    let cold = start.elapsed();
    assert_eq!(r.access, Access::Granted, "{r:?}");
    assert_eq!((r.registry_requests, r.token_requests), (2, 0));
    // The kubelet's usual shape (docker-config `auth`), through the trait.
    let access = Verifier::check(
        &v,
        &img,
        &pushed.digest,
        Some(&cred_from_auth_field("alice", "pw-alice")),
    )
    .await
    .expect("check");
    assert_eq!(access, Access::Granted);

    // Wrong password.
    let r = v
        .verify(&img, &pushed.digest, Some(&cred("alice", "wrong-pw")))
        .await
        .expect("check");
    let why = reason(&r);
    assert!(
        why.contains("rejected the credentials of user \"alice\""),
        "{why}"
    );
    assert!(why.contains("Basic realm"), "{why}");
    assert!(!why.contains("wrong-pw"), "{why}");

    // Anonymous on a private registry.
    let r = v.verify(&img, &pushed.digest, None).await.expect("check");
    let why = reason(&r);
    assert!(why.contains("requires authentication"), "{why}");
    assert_eq!(r.requests(), 1);

    // A digest the registry does not have.
    let r = v
        .verify(&img, UNKNOWN, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check");
    let why = reason(&r);
    assert!(why.contains("404") && why.contains(UNKNOWN), "{why}");

    // A malformed digest: refused before any request.
    let sent = v.stats().registry_requests;
    let e = v
        .verify(&img, "sha256:not-hex", Some(&cred("alice", "pw-alice")))
        .await
        .unwrap_err();
    assert!(matches!(e, VerifyError::InvalidDigest { .. }), "{e}");
    assert_eq!(v.stats().registry_requests, sent);

    // Warm cost: the Basic challenge is remembered, the connection pooled.
    let (p50, p99) = time_checks(
        &v,
        &img,
        &pushed.digest,
        Some(&cred("alice", "pw-alice")),
        50,
    )
    .await;
    let r = v
        .verify(&img, &pushed.digest, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check");
    assert_eq!(r.requests(), 1, "{r:?}");
    // The registry's own floor: an anonymous HEAD answered 401 without any
    // password hashing (one request per check too).
    let mut anon = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let r = v.verify(&img, &pushed.digest, None).await.expect("check");
        anon.push(start.elapsed().as_micros());
        assert_eq!(r.requests(), 1);
    }
    anon.sort_unstable();
    println!(
        "basic-auth registry: anonymous 401 round trip p50 {} µs",
        anon[25]
    );

    // Every HEAD the verifier counted reached the registry; no blob was read.
    let stats = v.stats();
    assert_eq!(
        (manifest_heads(&registry) - heads_before) as u64,
        stats.registry_requests
    );
    assert_eq!(
        blob_gets(&registry),
        blobs_before,
        "a check downloaded a blob"
    );
    println!(
        "basic-auth registry: cold check {:?} (2 requests), warm check p50 {p50} µs p99 {p99} µs (1 request); {stats:?}",
        cold
    );

    // Registry down: can't verify (an error, never a grant).
    registry.stop();
    let e = v
        .verify(&img, &pushed.digest, Some(&cred("alice", "pw-alice")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Unreachable { .. } | VerifyError::Transport { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(&registry.host()), "{e}");
    // A fresh connection attempt is refused outright.
    let e = v
        .verify(&img, &pushed.digest, Some(&cred("alice", "pw-alice")))
        .await
        .unwrap_err();
    assert!(matches!(e, VerifyError::Unreachable { .. }), "{e}");
    registry.restart().expect("restart");
    let r = v
        .verify(&img, &pushed.digest, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check after restart");
    assert_eq!(r.access, Access::Granted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_registry() {
    let registry = Registry::start_token_auth(
        &[("alice", "pw-alice"), ("carol", "pw-carol")],
        &[
            Grant::new("alice", "team/app", &["pull", "push"]),
            Grant::new("alice", "public/base", &["pull", "push"]),
            Grant::new(ANYONE, "public/base", &["pull"]),
        ],
    )
    .expect("registry");
    let private =
        build_and_push_image(&registry, "team/app", "v1", ("alice", "pw-alice")).expect("push");
    let public =
        build_and_push_image(&registry, "public/base", "v1", ("alice", "pw-alice")).expect("push");
    let img = image(&private);
    let v = verifier(&registry);
    let heads_before = manifest_heads(&registry);
    let tokens_before = registry.token_requests().len();
    let blobs_before = blob_gets(&registry);

    // User with a grant: HEAD 401 Bearer, token, HEAD with the token.
    let start = Instant::now();
    let r = v
        .verify(&img, &private.digest, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check");
    let cold = start.elapsed();
    assert_eq!(r.access, Access::Granted, "{r:?}");
    assert_eq!((r.registry_requests, r.token_requests), (2, 1));
    let last = registry.token_requests().pop().expect("token request");
    assert_eq!(last.method, "GET");
    assert_eq!(last.user.as_deref(), Some("alice"));
    assert_eq!(last.requested, vec!["repository:team/app:pull".to_string()]);

    // Valid user without a grant: the token endpoint says 200 (empty
    // access); only the manifest answer tells.
    let r = v
        .verify(&img, &private.digest, Some(&cred("carol", "pw-carol")))
        .await
        .expect("check");
    let why = reason(&r);
    assert!(why.contains("user \"carol\" has no pull access"), "{why}");
    assert!(why.contains("insufficient_scope"), "{why}");
    let last = registry.token_requests().pop().expect("token request");
    assert_eq!((last.status, last.granted.len()), (200, 0), "{last:?}");

    // Wrong password: the token endpoint refuses.
    let r = v
        .verify(&img, &private.digest, Some(&cred("alice", "wrong-pw")))
        .await
        .expect("check");
    let why = reason(&r);
    assert!(
        why.contains("token endpoint") && why.contains("401"),
        "{why}"
    );
    assert!(!why.contains("wrong-pw"), "{why}");
    assert_eq!((r.registry_requests, r.token_requests), (0, 1));

    // Anonymous: private denied, public granted.
    let r = v.verify(&img, &private.digest, None).await.expect("check");
    assert!(reason(&r).contains("cannot be pulled anonymously"), "{r:?}");
    let r = v
        .verify(&image(&public), &public.digest, None)
        .await
        .expect("check");
    assert_eq!(r.access, Access::Granted, "{r:?}");
    // Any user may pull the public image too.
    let r = v
        .verify(
            &image(&public),
            &public.digest,
            Some(&cred("carol", "pw-carol")),
        )
        .await
        .expect("check");
    assert_eq!(r.access, Access::Granted, "{r:?}");

    // Unknown digest with good credentials.
    let r = v
        .verify(&img, UNKNOWN, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check");
    assert!(reason(&r).contains("404"), "{r:?}");

    // Warm cost: challenge remembered, so token + one HEAD.
    let (p50, p99) = time_checks(
        &v,
        &img,
        &private.digest,
        Some(&cred("alice", "pw-alice")),
        50,
    )
    .await;
    let r = v
        .verify(&img, &private.digest, Some(&cred("alice", "pw-alice")))
        .await
        .expect("check");
    assert_eq!((r.registry_requests, r.token_requests), (1, 1), "{r:?}");

    let stats = v.stats();
    assert_eq!(
        (manifest_heads(&registry) - heads_before) as u64,
        stats.registry_requests
    );
    assert_eq!(
        (registry.token_requests().len() - tokens_before) as u64,
        stats.token_requests
    );
    assert_eq!(
        blob_gets(&registry),
        blobs_before,
        "a check downloaded a blob"
    );
    println!(
        "token-auth registry: cold check {:?} (3 requests), warm check p50 {p50} µs p99 {p99} µs (2 requests); {stats:?}",
        cold
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_registry_is_a_tls_error() {
    let registry = Registry::start_basic_auth(&[("alice", "pw-alice")]).expect("registry");
    let other = credlet_test_util::TestCa::new("some other CA").expect("ca");
    let v = RegistryVerifier::new(RegistryVerifierConfig {
        extra_root_pems: vec![other.cert_pem().to_string()],
        use_system_roots: false,
        ..RegistryVerifierConfig::default()
    })
    .expect("verifier");
    let img = ImageRef::parse(&registry.image_ref("team/app", "v1")).expect("ref");
    let e = v
        .verify(&img, UNKNOWN, Some(&cred("alice", "pw-alice")))
        .await
        .unwrap_err();
    assert!(matches!(e, VerifyError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
}
