//! `KubePodIndex` and `KubeEvents` against the in-process fake API server
//! (real `kube` client, real REST + watch protocol, real object JSON).

use std::time::{Duration, Instant};

use credlet_imageguard::events::{
    DENIED_REASON, EventSink, EventsConfig, KubeEvents, MAX_MESSAGE_BYTES, PodRef,
};
use credlet_imageguard::pods::{KubePodIndex, PodIndex, PullPolicy};
use credlet_test_util::FakeApiServer;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn pod(ns: &str, name: &str, node: &str, images: &[&str]) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeName": node,
            "containers": containers,
            "initContainers": [{"name": "init", "image": "127.0.0.1:5000/init:v1", "imagePullPolicy": "Always"}],
        },
        "status": {"phase": "Running"},
    })
}

/// Polls `f` until it holds or [`WAIT`] passes.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn uid_of(server: &FakeApiServer, ns: &str, name: &str) -> String {
    server.pod(ns, name).unwrap().metadata.uid.unwrap()
}

fn names(index: &KubePodIndex, image: &str) -> Vec<String> {
    let mut v: Vec<String> = index
        .pods_using(&|i| i == image)
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn pod_index_follows_the_pods_of_its_node() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod(
            "ns1",
            "a",
            "node-a",
            &["nginx", "127.0.0.1:5000/app:v1"],
        ))
        .unwrap();
    server
        .create_pod(&pod("ns2", "b", "node-a", &["127.0.0.1:5000/app:v1"]))
        .unwrap();
    server
        .create_pod(&pod(
            "ns1",
            "elsewhere",
            "node-b",
            &["127.0.0.1:5000/app:v1"],
        ))
        .unwrap();
    let (index, task) = KubePodIndex::start(server.kube_client().unwrap(), "node-a");
    tokio::time::timeout(WAIT, index.wait_synced())
        .await
        .unwrap();
    assert!(index.is_synced());
    assert_eq!(index.len(), 2);
    assert_eq!(names(&index, "127.0.0.1:5000/app:v1"), ["ns1/a", "ns2/b"]);
    let a = index.pod(&uid_of(&server, "ns1", "a")).unwrap();
    let images: Vec<(&str, PullPolicy)> = a
        .images
        .iter()
        .map(|c| (c.image.as_str(), c.pull_policy))
        .collect();
    assert_eq!(
        images,
        [
            ("127.0.0.1:5000/init:v1", PullPolicy::Always),
            ("nginx", PullPolicy::Always),
            ("127.0.0.1:5000/app:v1", PullPolicy::IfNotPresent),
        ]
    );
    assert!(index.pod(&uid_of(&server, "ns1", "elsewhere")).is_none());

    // Only this node's pods are asked for, by list and by watch.
    let requests = server.requests();
    let pod_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect();
    assert!(pod_requests.iter().any(|r| !r.is_watch()));
    assert!(
        pod_requests
            .iter()
            .all(|r| r.param("fieldSelector").as_deref() == Some("spec.nodeName=node-a")),
        "{pod_requests:#?}"
    );
    eventually("the watch to open", || server.open_watches() == 1).await;

    // Changes arrive through the watch.
    server
        .create_pod(&pod("ns1", "c", "node-a", &["redis:7"]))
        .unwrap();
    eventually("pod c", || names(&index, "redis:7") == ["ns1/c"]).await;
    server
        .update_pod(&pod("ns1", "c", "node-a", &["redis:8"]))
        .unwrap();
    eventually("pod c's new image", || {
        names(&index, "redis:8") == ["ns1/c"] && names(&index, "redis:7").is_empty()
    })
    .await;
    server.delete_pod("ns2", "b").unwrap();
    eventually("pod b gone", || {
        names(&index, "127.0.0.1:5000/app:v1") == ["ns1/a"]
    })
    .await;
    // A pod scheduled later (nodeName set by the binding) appears.
    server
        .create_pod(&pod("ns3", "late", "", &["late:1"]))
        .unwrap();
    server
        .update_pod(&pod("ns3", "late", "node-a", &["late:1"]))
        .unwrap();
    eventually("pod late", || names(&index, "late:1") == ["ns3/late"]).await;
    // A finished pod leaves the index.
    let mut done = pod("ns3", "late", "node-a", &["late:1"]);
    done["status"]["phase"] = json!("Succeeded");
    server.update_pod(&done).unwrap();
    eventually("pod late finished", || names(&index, "late:1").is_empty()).await;
    assert_eq!(index.watch_errors(), 0);
    task.abort();
}

#[tokio::test]
async fn pod_index_recovers_from_api_errors_and_relists_after_410() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod("ns1", "a", "node-a", &["app:1"]))
        .unwrap();
    server
        .create_pod(&pod("ns1", "b", "node-a", &["app:1"]))
        .unwrap();
    // The API server refuses the first list: not synced, then (after
    // kube's backoff) synced.
    server.fail_requests("GET", "/api/v1/pods?", 1, 500);
    let (index, task) = KubePodIndex::start(server.kube_client().unwrap(), "node-a");
    tokio::time::timeout(WAIT, index.wait_synced())
        .await
        .unwrap();
    assert_eq!(names(&index, "app:1"), ["ns1/a", "ns1/b"]);
    assert!(index.watch_errors() >= 1);
    eventually("the watch to open", || server.open_watches() == 1).await;

    // The watch breaks; while the index reconnects, b is deleted and c
    // created, and the history is compacted: the resumed watch gets 410,
    // and the re-list replaces the contents (b gone without a DELETED).
    let errors_before = index.watch_errors();
    server.clear_requests();
    server.delay_requests("GET", "watch=true", 1, Duration::from_millis(300));
    server.close_watches();
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.delete_pod("ns1", "b").unwrap();
    server
        .create_pod(&pod("ns1", "c", "node-a", &["app:1"]))
        .unwrap();
    server.expire_watch_history();
    eventually("the re-list", || {
        names(&index, "app:1") == ["ns1/a", "ns1/c"]
    })
    .await;
    assert!(index.is_synced());
    assert!(index.watch_errors() > errors_before, "the 410 is seen");
    let relists = server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && !r.is_watch())
        .count();
    assert_eq!(relists, 1);
    task.abort();
}

fn pod_ref(server: &FakeApiServer, ns: &str, name: &str) -> PodRef {
    PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: uid_of(server, ns, name),
    }
}

fn fast() -> EventsConfig {
    EventsConfig {
        update_interval: Duration::from_millis(200),
        ..EventsConfig::default()
    }
}

#[tokio::test]
async fn kube_events_posts_warnings_and_aggregates_repeats() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod("ns1", "web", "node-a", &["127.0.0.1:5000/app:v1"]))
        .unwrap();
    let web = pod_ref(&server, "ns1", "web");
    let (events, task) = KubeEvents::start_with(server.kube_client().unwrap(), "node-a", fast());
    let reason =
        "credentials of pod ns1/web are not authorized for cached image 127.0.0.1:5000/app:v1";
    events.image_denied(&web, "127.0.0.1:5000/app:v1", reason);
    eventually("the event", || server.events().len() == 1).await;
    let e = &server.core_events()[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.reason.as_deref(), Some(DENIED_REASON));
    assert_eq!(e.metadata.namespace.as_deref(), Some("ns1"));
    assert!(e.metadata.name.as_deref().unwrap().starts_with("web."));
    let involved = &e.involved_object;
    assert_eq!(
        (
            involved.kind.as_deref(),
            involved.api_version.as_deref(),
            involved.namespace.as_deref(),
            involved.name.as_deref(),
            involved.uid.as_deref()
        ),
        (
            Some("Pod"),
            Some("v1"),
            Some("ns1"),
            Some("web"),
            Some(web.uid.as_str())
        )
    );
    let source = e.source.clone().unwrap();
    assert_eq!(source.component.as_deref(), Some("credlet"));
    assert_eq!(source.host.as_deref(), Some("node-a"));
    assert_eq!(e.reporting_component.as_deref(), Some("credlet"));
    assert_eq!(e.reporting_instance.as_deref(), Some("node-a"));
    assert_eq!(e.count, Some(1));
    assert!(e.first_timestamp.is_some() && e.last_timestamp.is_some());
    let message = e.message.clone().unwrap();
    assert!(
        message.contains("127.0.0.1:5000/app:v1") && message.contains(reason),
        "{message}"
    );
    let post = server
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(
        (post.path.as_str(), post.status),
        ("/api/v1/namespaces/ns1/events", 201)
    );

    // Repeats: no new Event, the count goes up (a few PATCHes, not one each).
    for _ in 0..20 {
        events.image_denied(&web, "127.0.0.1:5000/app:v1", reason);
    }
    eventually("count 21", || server.core_events()[0].count == Some(21)).await;
    assert_eq!(server.events().len(), 1);
    let patches = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert!((1..=3).contains(&patches), "{patches} patches");
    assert!(server.core_events()[0].last_timestamp >= server.core_events()[0].first_timestamp);

    // Another image or another reason: another Event; a long reason is cut.
    events.image_denied(&web, "127.0.0.1:5000/other:v1", &"x".repeat(5000));
    eventually("second event", || server.events().len() == 2).await;
    let long = server.core_events()[1].message.clone().unwrap();
    assert!(long.len() <= MAX_MESSAGE_BYTES, "{}", long.len());
    assert_eq!(
        (events.created(), events.failed(), events.dropped()),
        (2, 0, 0)
    );
    assert!(events.updated() >= 1);
    drop(events);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn kube_events_recreates_an_expired_event_and_survives_api_errors() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod("ns1", "web", "node-a", &["app:1"]))
        .unwrap();
    let web = pod_ref(&server, "ns1", "web");
    let (events, task) = KubeEvents::start_with(server.kube_client().unwrap(), "node-a", fast());

    // The API server fails the create: counted, nothing blocks, and the
    // Event is created on a later tick, once the API server answers (it
    // may have been down: the guard serves without it).
    server.fail_requests("POST", "/events", 1, 500);
    events.image_denied(&web, "app:1", "no credentials");
    eventually("the failure", || events.failed() == 1).await;
    eventually("the event, created again", || server.events().len() == 1).await;
    let with = |needle: &str| {
        server
            .core_events()
            .into_iter()
            .find(|e| e.message.as_deref().is_some_and(|m| m.contains(needle)))
    };
    assert_eq!(with("no credentials").expect("created late").count, Some(1));
    events.image_denied(&web, "app:1", "wrong credentials");
    eventually("the second event", || server.events().len() == 2).await;

    // The Event expires (the API server's TTL): the next update re-creates
    // it, carrying the count.
    let name = with("wrong credentials")
        .expect("event")
        .metadata
        .name
        .expect("name");
    server.delete("v1", "Event", Some("ns1"), &name).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    events.image_denied(&web, "app:1", "wrong credentials");
    eventually("the re-created event", || server.events().len() == 2).await;
    let e = with("wrong credentials").expect("re-created");
    assert_ne!(e.metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(e.count, Some(2));
    drop(events);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn kube_events_never_block_the_caller() {
    let server = FakeApiServer::start().unwrap();
    server
        .create_pod(&pod("ns1", "web", "node-a", &["app:1"]))
        .unwrap();
    let web = pod_ref(&server, "ns1", "web");
    // A slow API server and a tiny queue.
    server.delay_requests("POST", "/events", 100, Duration::from_millis(500));
    let config = EventsConfig {
        queue_capacity: 2,
        ..fast()
    };
    let (events, task) = KubeEvents::start_with(server.kube_client().unwrap(), "node-a", config);
    let start = Instant::now();
    for i in 0..50 {
        events.image_denied(&web, &format!("app:{i}"), "denied");
    }
    let spent = start.elapsed();
    assert!(
        spent < Duration::from_millis(100),
        "image_denied blocked for {spent:?}"
    );
    assert!(events.dropped() >= 40, "dropped {}", events.dropped());
    task.abort();
}
