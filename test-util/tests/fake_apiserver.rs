//! The fake API server against the real `kube` client and runtime: list,
//! get, field selectors, pagination, raw watches (event types, bookmarks,
//! timeouts), `kube::runtime::watcher` (ordering, re-list after 410), Event
//! creation (core/v1, `events.k8s.io/v1`, kube's `Recorder`), TokenReview,
//! and the upstream JSON fixtures.

use std::path::PathBuf;
use std::time::Duration;

use credlet_test_util::{FakeApiServer, ResourceType};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::authentication::v1::{
    TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo,
};
use k8s_openapi::api::core::v1::{Event, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// A realistic pod (the upstream fixture's field names, realistic values).
fn pod(ns: &str, name: &str, node: &str, image: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Always",
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent"}],
            "initContainers": [{"name": "init", "image": "busybox:1.36"}],
        },
        "status": {"phase": "Pending"},
    })
}

async fn next<S, T>(stream: &mut S) -> T
where
    S: futures_util::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("stream item in time")
        .expect("stream not ended")
}

fn image(p: &Pod) -> String {
    p.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap()
}

fn describe(e: watcher::Event<Pod>) -> String {
    match e {
        watcher::Event::Init => "Init".to_string(),
        watcher::Event::InitApply(p) => format!("InitApply {}", p.name_any()),
        watcher::Event::InitDone => "InitDone".to_string(),
        watcher::Event::Apply(p) => format!("Apply {} {}", p.name_any(), image(&p)),
        watcher::Event::Delete(p) => format!("Delete {}", p.name_any()),
    }
}

type PodWatch = BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>;

async fn take(w: &mut PodWatch, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(describe(next(w).await.unwrap()));
    }
    out
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn list_get_and_field_selectors_through_kube() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod("ns1", "a", "node-a", "nginx"))
        .unwrap();
    server
        .create_pod(&pod("ns2", "b", "node-a", "nginx"))
        .unwrap();
    server
        .create_pod(&pod("ns1", "c", "node-b", "nginx"))
        .unwrap();
    let client = server.kube_client().unwrap();

    let all: Api<Pod> = Api::all(client.clone());
    let list = all
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    let mut names: Vec<_> = list.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        list.metadata.resource_version.as_deref(),
        Some(server.resource_version().to_string().as_str())
    );
    let req = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/v1/pods")
        .unwrap();
    assert_eq!(
        req.param("fieldSelector").as_deref(),
        Some("spec.nodeName=node-a")
    );
    assert!(
        req.query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{req}"
    );

    let ns1: Api<Pod> = Api::namespaced(client.clone(), "ns1");
    assert_eq!(
        ns1.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    let a = ns1.get("a").await.unwrap();
    assert_eq!(a.spec.unwrap().node_name.as_deref(), Some("node-a"));
    assert!(a.metadata.uid.is_some());

    let missing = ns1.get("nope").await.unwrap_err();
    assert_eq!(api_code(&missing), Some(404));
    let bad = all
        .list(&ListParams::default().fields("spec.nodename=node-a"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&bad), Some(400), "{bad}");
    let labelled = all
        .list(&ListParams::default().labels("app in (a, c)"))
        .await
        .unwrap();
    assert_eq!(labelled.items.len(), 2);

    // Unknown paths: 404 Status.
    let unknown: Api<k8s_openapi::api::apps::v1::Deployment> = Api::all(client.clone());
    assert_eq!(
        api_code(&unknown.list(&ListParams::default()).await.unwrap_err()),
        Some(404)
    );
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
}

#[tokio::test]
async fn pagination_with_continue_tokens() {
    let server = FakeApiServer::start().unwrap();
    for i in 0..5 {
        server
            .create_pod(&pod("ns1", &format!("p{i}"), "node-a", "nginx"))
            .unwrap();
    }
    let api: Api<Pod> = Api::all(server.kube_client().unwrap());
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let mut seen: Vec<String> = first.items.iter().map(|p| p.name_any()).collect();
    let mut token = first.metadata.continue_.clone();
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        seen.extend(page.items.iter().map(|p| p.name_any()));
        token = page.metadata.continue_;
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4"]);
    // A token older than the kept history: 410.
    let t = first.metadata.continue_.unwrap();
    server
        .create_pod(&pod("ns1", "later", "node-a", "nginx"))
        .unwrap();
    server.expire_watch_history();
    let err = api
        .list(&ListParams::default().limit(2).continue_token(&t))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(410));
}

#[tokio::test]
async fn raw_watch_event_types_bookmarks_and_timeout() {
    let server = FakeApiServer::start().unwrap();
    server.set_bookmark_interval(Duration::from_millis(100));
    server
        .create_pod(&pod("ns1", "before", "node-a", "nginx"))
        .unwrap();
    let api: Api<Pod> = Api::all(server.kube_client().unwrap());
    let rv = server.resource_version().to_string();
    let wp = WatchParams::default()
        .fields("spec.nodeName=node-a")
        .timeout(3);
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
    while server.open_watches() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    server
        .create_pod(&pod("ns1", "x", "node-a", "nginx:1"))
        .unwrap();
    server
        .create_pod(&pod("ns1", "other-node", "node-b", "nginx"))
        .unwrap();
    server
        .update_pod(&pod("ns1", "x", "node-a", "nginx:2"))
        .unwrap();
    // Moving out of the selector is a DELETED, moving in an ADDED.
    server
        .update_pod(&pod("ns1", "other-node", "node-a", "nginx"))
        .unwrap();
    server
        .update_pod(&pod("ns1", "other-node", "node-c", "nginx"))
        .unwrap();
    server.delete_pod("ns1", "x").unwrap();

    let mut got = Vec::new();
    while got.len() < 5 {
        match next(&mut stream).await.unwrap() {
            WatchEvent::Added(p) => got.push(format!("ADDED {}", p.name_any())),
            WatchEvent::Modified(p) => got.push(format!("MODIFIED {} {}", p.name_any(), image(&p))),
            WatchEvent::Deleted(p) => got.push(format!("DELETED {}", p.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        got,
        [
            "ADDED x",
            "MODIFIED x nginx:2",
            "ADDED other-node",
            "DELETED other-node",
            "DELETED x"
        ]
    );
    // Bookmarks carry the latest resourceVersion.
    loop {
        if let WatchEvent::Bookmark(b) = next(&mut stream).await.unwrap() {
            assert_eq!(
                b.metadata.resource_version,
                server.resource_version().to_string()
            );
            assert_eq!(b.types.kind, "Pod");
            break;
        }
    }
    // timeoutSeconds=3 ends the stream.
    let start = std::time::Instant::now();
    while tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .is_some()
    {}
    assert!(start.elapsed() < Duration::from_secs(4));
    let watch_req = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch())
        .unwrap();
    assert_eq!(watch_req.param("timeoutSeconds").as_deref(), Some("3"));
    assert_eq!(
        watch_req.param("allowWatchBookmarks").as_deref(),
        Some("true")
    );

    // A watch from an expired resourceVersion: one ERROR event with 410.
    server.expire_watch_history();
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();
    match next(&mut stream).await.unwrap() {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn kube_watcher_sees_changes_in_order_and_relists_after_410() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod("ns1", "old", "node-a", "nginx"))
        .unwrap();
    server
        .create_pod(&pod("ns1", "elsewhere", "node-b", "nginx"))
        .unwrap();
    let api: Api<Pod> = Api::all(server.kube_client().unwrap());
    let cfg = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut w: PodWatch = watcher(api, cfg).boxed();

    assert_eq!(take(&mut w, 3).await, ["Init", "InitApply old", "InitDone"]);

    server
        .create_pod(&pod("ns1", "new", "node-a", "nginx:1"))
        .unwrap();
    server
        .update_pod(&pod("ns1", "new", "node-a", "nginx:2"))
        .unwrap();
    server.delete_pod("ns1", "old").unwrap();
    server
        .create_pod(&pod("ns1", "ignored", "node-b", "nginx"))
        .unwrap();
    assert_eq!(
        take(&mut w, 3).await,
        ["Apply new nginx:1", "Apply new nginx:2", "Delete old"]
    );

    // Break the watch, change things while the watcher reconnects, and
    // expire the history: the reconnect gets 410 and the watcher re-lists.
    server.delay_requests("GET", "watch=true", 1, Duration::from_millis(300));
    server.close_watches();
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.delete_pod("ns1", "new").unwrap();
    server
        .create_pod(&pod("ns1", "fresh", "node-a", "nginx:3"))
        .unwrap();
    server.expire_watch_history();
    match tokio::time::timeout(WAIT, w.next()).await.unwrap().unwrap() {
        Err(watcher::Error::WatchError(s)) => assert_eq!(s.code, 410),
        other => panic!("expected the 410, got {:?}", other.map(describe)),
    }
    assert_eq!(
        take(&mut w, 3).await,
        ["Init", "InitApply fresh", "InitDone"]
    );
    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.is_watch())
        .collect();
    assert_eq!(lists.len(), 2, "initial list + re-list");
    assert!(
        lists
            .iter()
            .all(|r| r.param("fieldSelector").as_deref() == Some("spec.nodeName=node-a"))
    );
    server
        .create_pod(&pod("ns1", "after", "node-a", "nginx:4"))
        .unwrap();
    assert_eq!(take(&mut w, 1).await, ["Apply after nginx:4"]);
}

fn core_event(ns: &str, pod: &Pod) -> Event {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", pod.name_any(), 0x1234_5678u64)),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        involved_object: pod.object_ref(&()),
        reason: Some("CachedImageAccessDenied".into()),
        message: Some("denied".into()),
        type_: Some("Warning".into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("credlet".into()),
            host: Some("node-a".into()),
        }),
        reporting_component: Some("credlet".into()),
        reporting_instance: Some("node-a".into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn events_through_kube_core_v1_events_v1_and_recorder() {
    let server = FakeApiServer::start().unwrap();
    let p = server
        .create_pod(&pod("ns1", "web", "node-a", "nginx"))
        .unwrap();
    let client = server.kube_client().unwrap();

    // core/v1
    let events: Api<Event> = Api::namespaced(client.clone(), "ns1");
    let created = events
        .create(&PostParams::default(), &core_event("ns1", &p))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    let post = server
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(
        (post.path.as_str(), post.status),
        ("/api/v1/namespaces/ns1/events", 201)
    );
    let patched = events
        .patch(
            &created.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"count": 2})),
        )
        .await
        .unwrap();
    assert_eq!(patched.count, Some(2));
    // The real server's check: the event's namespace must be the pod's.
    let wrong: Api<Event> = Api::namespaced(client.clone(), "ns2");
    let mut e = core_event("ns2", &p);
    e.metadata.namespace = Some("ns2".into());
    assert_eq!(
        api_code(&wrong.create(&PostParams::default(), &e).await.unwrap_err()),
        Some(422)
    );

    // events.k8s.io/v1, by hand and through kube's Recorder.
    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "ns1");
    let ev = k8s_openapi::api::events::v1::Event {
        metadata: ObjectMeta {
            generate_name: Some("web-".into()),
            ..Default::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        reporting_controller: Some("credlet".into()),
        reporting_instance: Some("node-a".into()),
        action: Some("Verify".into()),
        reason: Some("CachedImageAccessDenied".into()),
        type_: Some("Warning".into()),
        regarding: Some(p.object_ref(&())),
        note: Some("denied".into()),
        ..Default::default()
    };
    let created = v1.create(&PostParams::default(), &ev).await.unwrap();
    assert!(created.name_any().starts_with("web-"));
    let mut incomplete = ev.clone();
    incomplete.event_time = None;
    assert_eq!(
        api_code(
            &v1.create(&PostParams::default(), &incomplete)
                .await
                .unwrap_err()
        ),
        Some(422)
    );

    let recorder = kube::runtime::events::Recorder::new(client.clone(), "credlet".into());
    let reference: ObjectReference = p.object_ref(&());
    let rec_ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "CachedImageAccessDenied".into(),
        note: Some("denied again".into()),
        action: "Verify".into(),
        secondary: None,
    };
    recorder.publish(&rec_ev, &reference).await.unwrap();
    recorder.publish(&rec_ev, &reference).await.unwrap(); // series → PATCH
    let all = server.events();
    assert_eq!(all.len(), 3, "{all:#?}");
    assert_eq!(all[0]["apiVersion"], "v1");
    assert_eq!(all[0]["count"], 2);
    assert_eq!(all[2]["series"]["count"], 2);
    assert_eq!(all[2]["note"], "denied again");
    assert_eq!(server.core_events().len(), 1);
}

#[tokio::test]
async fn token_reviews_are_answered_by_the_test_closure() {
    let server = FakeApiServer::start().unwrap();
    server.set_token_reviewer(|review: &TokenReview| {
        let ok = review.spec.token.as_deref() == Some("good-token");
        TokenReviewStatus {
            authenticated: Some(ok),
            audiences: review.spec.audiences.clone(),
            user: ok.then(|| UserInfo {
                username: Some("system:serviceaccount:ns1:sa".into()),
                uid: Some("uid-1".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    });
    let api: Api<TokenReview> = Api::all(server.kube_client().unwrap());
    let review = |t: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(t.into()),
            audiences: Some(vec!["credlet".into()]),
        },
        ..Default::default()
    };
    let good = api
        .create(&PostParams::default(), &review("good-token"))
        .await
        .unwrap();
    let status = good.status.unwrap();
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(
        status.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:ns1:sa")
    );
    assert_eq!(status.audiences, Some(vec!["credlet".to_string()]));
    let bad = api
        .create(&PostParams::default(), &review("bad"))
        .await
        .unwrap();
    assert_eq!(bad.status.unwrap().authenticated, Some(false));
}

#[tokio::test]
async fn injected_failures_and_registered_types() {
    let server = FakeApiServer::start().unwrap();
    let api: Api<Pod> = Api::all(server.kube_client().unwrap());
    server.fail_requests("GET", "/api/v1/pods", 1, 500);
    assert_eq!(
        api_code(&api.list(&ListParams::default()).await.unwrap_err()),
        Some(500)
    );
    // kube retries 503 by itself.
    server.clear_requests();
    server.fail_requests("GET", "/api/v1/pods", 1, 503);
    api.list(&ListParams::default()).await.unwrap();
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200]);

    server.register(ResourceType::of::<k8s_openapi::api::apps::v1::Deployment>());
    let d: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(server.kube_client().unwrap(), "ns1");
    assert!(
        d.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// The upstream fixtures (`shared/k8s-api-examples`, beside the repository)
/// stored as JSON and read back through kube's typed API: field names and
/// shapes agree. Skipped when the folder is absent.
#[tokio::test]
async fn upstream_fixtures_round_trip_through_kube() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s-api-examples");
    if !dir.is_dir() {
        eprintln!("skipped: {} not present", dir.display());
        return;
    }
    let server = FakeApiServer::start().unwrap();
    let client = server.kube_client().unwrap();
    let load = |file: &str| -> Option<Value> {
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        let mut v: Value = serde_json::from_str(&text).ok()?;
        // A ClusterTrustBundle linked to a signer must carry the signer's
        // name as its prefix, as the real API server insists.
        let name = match v["spec"]["signerName"].as_str() {
            Some(signer) if v["kind"] == "ClusterTrustBundle" => {
                format!("{}:fixture", signer.replace('/', ":"))
            }
            _ => "fixture".to_owned(),
        };
        v["metadata"]["name"] = json!(name);
        if v["metadata"].get("namespace").is_some() {
            v["metadata"]["namespace"] = json!("namespaceValue");
        }
        Some(v)
    };

    async fn check<K>(server: &FakeApiServer, api: Api<K>, fixture: Value)
    where
        K: Resource<DynamicType = ()>
            + k8s_openapi::Resource
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
    {
        let stored = server.create(&fixture).unwrap();
        let name = fixture["metadata"]["name"].as_str().unwrap();
        let typed = api.get(name).await.unwrap();
        let back = serde_json::to_value(&typed).unwrap();
        let mut diffs = Vec::new();
        subset_diffs(&back, &stored, "", &mut diffs);
        assert!(diffs.is_empty(), "{}: {diffs:#?}", K::KIND);
        // Unknown fields survive in the server (it stores JSON as sent).
        let spec_in = fixture.get("spec").cloned().unwrap_or(Value::Null);
        assert_eq!(stored.get("spec").cloned().unwrap_or(Value::Null), spec_in);
    }

    use k8s_openapi::api::{
        certificates::v1beta1, coordination::v1::Lease, core::v1 as core, storage::v1::CSIDriver,
    };
    let mut checked = 0;
    if let Some(v) = load("core.v1.Pod.json") {
        check::<Pod>(
            &server,
            Api::namespaced(client.clone(), "namespaceValue"),
            v,
        )
        .await;
        checked += 1;
    }
    if let Some(v) = load("core.v1.Node.json") {
        check::<core::Node>(&server, Api::all(client.clone()), v).await;
        checked += 1;
    }
    if let Some(v) = load("core.v1.Event.json") {
        let mut v = v;
        v["involvedObject"]["namespace"] = json!("namespaceValue");
        check::<Event>(
            &server,
            Api::namespaced(client.clone(), "namespaceValue"),
            v,
        )
        .await;
        checked += 1;
    }
    if let Some(v) = load("coordination.k8s.io.v1.Lease.json") {
        check::<Lease>(
            &server,
            Api::namespaced(client.clone(), "namespaceValue"),
            v,
        )
        .await;
        checked += 1;
    }
    if let Some(v) = load("core.v1.Secret.json") {
        check::<core::Secret>(
            &server,
            Api::namespaced(client.clone(), "namespaceValue"),
            v,
        )
        .await;
        checked += 1;
    }
    if let Some(v) = load("core.v1.ServiceAccount.json") {
        check::<core::ServiceAccount>(
            &server,
            Api::namespaced(client.clone(), "namespaceValue"),
            v,
        )
        .await;
        checked += 1;
    }
    if let Some(v) = load("storage.k8s.io.v1.CSIDriver.json") {
        check::<CSIDriver>(&server, Api::all(client.clone()), v).await;
        checked += 1;
    }
    if let Some(v) = load("certificates.k8s.io.v1beta1.PodCertificateRequest.json") {
        check::<v1beta1::PodCertificateRequest>(
            &server,
            Api::namespaced(client.clone(), "namespaceValue"),
            v,
        )
        .await;
        checked += 1;
    }
    if let Some(v) = load("certificates.k8s.io.v1beta1.ClusterTrustBundle.json") {
        check::<v1beta1::ClusterTrustBundle>(&server, Api::all(client.clone()), v).await;
        checked += 1;
    }
    assert!(checked > 0);
}

/// Fields of `a` (what kube's types kept) that differ from `b` (what the
/// server stored). Server-set metadata is skipped.
fn subset_diffs(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(ao), Value::Object(bo)) => {
            for (k, av) in ao {
                let p = format!("{path}.{k}");
                if matches!(
                    p.as_str(),
                    ".metadata.uid" | ".metadata.resourceVersion" | ".metadata.creationTimestamp"
                ) {
                    continue;
                }
                match bo.get(k) {
                    Some(bv) => subset_diffs(av, bv, &p, out),
                    None => out.push(format!("{p}: missing on the server")),
                }
            }
        }
        (Value::Array(aa), Value::Array(ba)) if aa.len() == ba.len() => {
            for (i, (av, bv)) in aa.iter().zip(ba).enumerate() {
                subset_diffs(av, bv, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        // Same instant, different text (e.g. fractional seconds).
        (Value::String(x), Value::String(y))
            if x.parse::<k8s_openapi::jiff::Timestamp>().ok()
                == y.parse::<k8s_openapi::jiff::Timestamp>().ok()
                && x.parse::<k8s_openapi::jiff::Timestamp>().is_ok() => {}
        _ => out.push(format!("{path}: {a} != {b}")),
    }
}
