//! Tests of the request type: serde against the upstream fixtures, the
//! kube resource for both API versions against the fake API server.

use std::path::PathBuf;

use kube::Resource as _;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

use super::*;

/// The upstream fixtures live in `shared/k8s-api-examples` beside the
/// repository.
fn fixture(file: &str) -> Option<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s-api-examples");
    if !dir.is_dir() {
        eprintln!("skipped: {} not present", dir.display());
        return None;
    }
    let text = std::fs::read_to_string(dir.join(file)).expect("read fixture");
    Some(serde_json::from_str(&text).expect("fixture is JSON"))
}

fn round_trip(value: &Value) -> (PodCertificateRequest, Value) {
    let typed: PodCertificateRequest = serde_json::from_value(value.clone()).expect("deserialize");
    let back = serde_json::to_value(&typed).expect("serialize");
    (typed, back)
}

#[test]
fn v1beta1_fixture_round_trips() {
    let Some(value) = fixture("certificates.k8s.io.v1beta1.PodCertificateRequest.json") else {
        return;
    };
    let (typed, back) = round_trip(&value);
    assert_eq!(back, value);
    assert_eq!(typed.api_version, Some(ApiVersion::V1beta1));
    let spec = &typed.spec;
    assert_eq!(spec.signer_name, "signerNameValue");
    assert_eq!(spec.pod_uid, "podUIDValue");
    assert_eq!(spec.service_account_uid, "serviceAccountUIDValue");
    assert_eq!(spec.node_uid, "nodeUIDValue");
    assert_eq!(spec.max_expiration_seconds, Some(8));
    assert_eq!(spec.pkix_public_key, Some(ByteString(vec![9])));
    assert_eq!(spec.proof_of_possession, Some(ByteString(vec![10])));
    assert_eq!(spec.stub_pkcs10_request, Some(ByteString(vec![12])));
    let status = typed.status.as_ref().expect("status");
    assert_eq!(
        status.certificate_chain.as_deref(),
        Some("certificateChainValue")
    );
    assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
}

#[test]
fn v1_fixture_round_trips() {
    let Some(value) = fixture("certificates.k8s.io.v1.PodCertificateRequest.json") else {
        return;
    };
    let (typed, back) = round_trip(&value);
    assert_eq!(back, value);
    assert_eq!(typed.api_version, Some(ApiVersion::V1));
    assert_eq!(typed.spec.pkix_public_key, None);
    assert_eq!(typed.spec.proof_of_possession, None);
    assert_eq!(typed.spec.stub_pkcs10_request, Some(ByteString(vec![12])));
}

/// What the API server sends for a 1.36 request: the deprecated fields as
/// `null` (they have no `omitempty`), and list items without `apiVersion`
/// and `kind`.
#[test]
fn nulls_and_missing_type_fields() {
    let value = json!({
        "metadata": {"name": "req-1", "namespace": "default"},
        "spec": {
            "signerName": "credlet.io/pod",
            "podName": "web-0",
            "podUID": "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10",
            "serviceAccountName": "web",
            "serviceAccountUID": "5a4c6f1e-93d2-4b8e-a1c7-0f2e3d4c5b6a",
            "nodeName": "node-a",
            "nodeUID": "8f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
            "pkixPublicKey": null,
            "proofOfPossession": null,
            "stubPKCS10Request": "MAA="
        }
    });
    let typed: PodCertificateRequest = serde_json::from_value(value).unwrap();
    assert_eq!(typed.api_version, None);
    assert_eq!(typed.spec.pkix_public_key, None);
    assert_eq!(
        typed.spec.stub_pkcs10_request,
        Some(ByteString(vec![0x30, 0]))
    );
    let back = serde_json::to_value(&typed).unwrap();
    assert!(back.get("apiVersion").is_none() && back.get("kind").is_none());
    assert!(back["spec"].get("pkixPublicKey").is_none());
    assert!(back.get("status").is_none());

    // A missing required field reads as empty (validate denies it) rather
    // than failing the whole list or watch.
    let typed: PodCertificateRequest =
        serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {}})).unwrap();
    assert_eq!(typed.spec.pod_uid, "");
}

#[test]
fn wrong_type_fields_are_refused() {
    let err = serde_json::from_value::<PodCertificateRequest>(json!({
        "apiVersion": "certificates.k8s.io/v1alpha1", "kind": "PodCertificateRequest",
        "metadata": {}, "spec": {}
    }))
    .unwrap_err();
    assert!(err.to_string().contains("v1alpha1"), "{err}");
    let err = serde_json::from_value::<PodCertificateRequest>(json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {}, "spec": {}
    }))
    .unwrap_err();
    assert!(
        err.to_string().contains("CertificateSigningRequest"),
        "{err}"
    );
}

#[test]
fn resource_paths_for_both_versions() {
    assert_eq!(
        PodCertificateRequest::url_path(&ApiVersion::V1beta1, Some("team-a")),
        "/apis/certificates.k8s.io/v1beta1/namespaces/team-a/podcertificaterequests"
    );
    assert_eq!(
        PodCertificateRequest::url_path(&ApiVersion::V1, None),
        "/apis/certificates.k8s.io/v1/podcertificaterequests"
    );
    assert_eq!(
        PodCertificateRequest::api_version(&ApiVersion::default()),
        "certificates.k8s.io/v1beta1"
    );
    assert_eq!(PodCertificateRequest::kind(&ApiVersion::V1), KIND);
    assert_eq!(PodCertificateRequest::group(&ApiVersion::V1), GROUP);
    assert_eq!(PodCertificateRequest::plural(&ApiVersion::V1), PLURAL);
}

fn stored_request(api_version: ApiVersion, name: &str) -> PodCertificateRequest {
    PodCertificateRequest {
        api_version: Some(api_version),
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("team-a".to_owned()),
            ..ObjectMeta::default()
        },
        spec: PodCertificateRequestSpec {
            signer_name: "credlet.io/pod".into(),
            pod_name: "web-0".into(),
            pod_uid: "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into(),
            service_account_name: "web".into(),
            service_account_uid: "5a4c6f1e-93d2-4b8e-a1c7-0f2e3d4c5b6a".into(),
            node_name: "node-a".into(),
            node_uid: "8f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b".into(),
            max_expiration_seconds: Some(3600),
            stub_pkcs10_request: Some(ByteString(vec![0x30, 0x00])),
            ..PodCertificateRequestSpec::default()
        },
        status: None,
    }
}

/// `kube::Api<PodCertificateRequest>` works for both versions: create, get,
/// list and status replace hit the version's own paths.
#[tokio::test]
async fn kube_api_for_both_versions() {
    let server = credlet_test_util::FakeApiServer::start().unwrap();
    let client = server.kube_client().unwrap();
    for version in [ApiVersion::V1beta1, ApiVersion::V1] {
        let api: Api<PodCertificateRequest> =
            Api::namespaced_with(client.clone(), "team-a", &version);
        let name = format!("req-{}", version.version());
        let created = api
            .create(&PostParams::default(), &stored_request(version, &name))
            .await
            .unwrap();
        assert_eq!(created.api_version, Some(version));
        assert!(created.metadata.uid.is_some());

        let got = api.get(&name).await.unwrap();
        assert_eq!(got.spec, stored_request(version, &name).spec);

        let listed = api.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 1);
        assert_eq!(listed.items[0].spec.pod_name, "web-0");

        let mut issued = got.clone();
        issued.status = Some(PodCertificateRequestStatus {
            certificate_chain: Some("chain".into()),
            ..PodCertificateRequestStatus::default()
        });
        let replaced = api
            .replace_status(&name, &PostParams::default(), &issued)
            .await
            .unwrap();
        assert_eq!(
            replaced.status.and_then(|s| s.certificate_chain).as_deref(),
            Some("chain")
        );
        let path = format!(
            "/apis/certificates.k8s.io/{}/namespaces/team-a/podcertificaterequests/{name}/status",
            version.version()
        );
        assert!(
            server.requests().iter().any(|r| r.path == path),
            "no request to {path}"
        );
    }
}
