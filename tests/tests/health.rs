//! The agent's health port: `/healthz`, `/readyz` and `/metrics` of a real
//! agent process while it publishes and rotates volumes on real tmpfs.

use std::net::SocketAddr;
use std::time::Duration;

use credlet_tests::harness::{TestEnv, wait_until};
use credlet_tests::{agent_bin, free_port, http_get, metric_value};

#[tokio::test]
async fn health_readiness_and_metrics_follow_the_volumes() {
    let mut env = TestEnv::new(agent_bin!());
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    env.extra_args.extend([
        "--health-listen".into(),
        addr.to_string(),
        "--per-volume-metrics".into(),
    ]);
    let csi = env.start().await;

    let (code, body) = http_get(addr, "/healthz").expect("healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = http_get(addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "readyz: {body}");
    let (code, _) = http_get(addr, "/nothing-here").expect("404");
    assert_eq!(code, 404);

    let (code, metrics) = http_get(addr, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert_eq!(metric_value(&metrics, "credlet_csi_volumes"), Some(0.0));
    // Every family is there from the start, with its type.
    for (family, kind) in [
        ("credlet_build_info", "gauge"),
        ("credlet_csi_volumes", "gauge"),
        ("credlet_csi_issuances", "counter"),
        ("credlet_csi_issuance_duration_seconds", "histogram"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} ({kind}) missing:\n{metrics}"
        );
    }
    let rss = metric_value(&metrics, "process_resident_memory_bytes").expect("RSS");
    assert!((1e6..1e9).contains(&rss), "resident memory {rss}");
    assert!(
        metrics.contains(&format!(
            "credlet_build_info{{version=\"{}\",mode=\"agent\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    assert!(
        !metrics.contains("credlet_csi_certificate_expiry_seconds "),
        "no expiry without volumes:\n{metrics}"
    );

    let short = env.volume("short").with("credlet.io/duration", "4s");
    let long = env.volume("long").with("credlet.io/duration", "1h");
    csi.publish(&short).await.expect("publish short");
    csi.publish(&long).await.expect("publish long");
    let (_, metrics) = http_get(addr, "/metrics").expect("metrics");
    assert_eq!(metric_value(&metrics, "credlet_csi_volumes"), Some(2.0));
    assert_eq!(
        metric_value(
            &metrics,
            r#"credlet_csi_issuances_total{operation="Publish",outcome="Success"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"credlet_csi_issuance_duration_seconds_count{operation="Publish",outcome="Success"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    // Per volume, with the pod's labels: the two certificates' notAfter.
    let per_volume: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("credlet_csi_certificate_expiration_timestamp_seconds{"))
        .collect();
    assert_eq!(per_volume.len(), 2, "{metrics}");
    for volume in [&short, &long] {
        let line = per_volume
            .iter()
            .find(|l| l.contains(&format!("volume=\"{}\"", volume.id)))
            .unwrap_or_else(|| panic!("no series for {}:\n{metrics}", volume.id));
        assert!(
            line.contains(&format!(
                "namespace=\"{}\",pod=\"{}\"",
                volume.pod.namespace, volume.pod.name
            )),
            "{line}"
        );
        let not_after: f64 = line
            .rsplit(' ')
            .next()
            .unwrap_or("")
            .parse()
            .expect("value");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(not_after > now - 5.0 && not_after < now + 3700.0, "{line}");
    }
    // The earliest expiry is the 4 s certificate's.
    let expiry =
        metric_value(&metrics, "credlet_csi_certificate_expiry_seconds").expect("expiry gauge");
    assert!((0.0..=4.5).contains(&expiry), "earliest expiry {expiry}");

    // Rotation shows up as renewals.
    wait_until("a renewal counted", Duration::from_secs(10), || {
        let (_, metrics) = http_get(addr, "/metrics")?;
        let renewed = metric_value(
            &metrics,
            r#"credlet_csi_issuances_total{operation="Renew",outcome="Success"}"#,
        )
        .unwrap_or(0.0);
        anyhow::ensure!(renewed >= 1.0, "renewals: {renewed}");
        Ok(())
    })
    .await;

    csi.unpublish_volume(&short).await.expect("unpublish");
    let (_, metrics) = http_get(addr, "/metrics").expect("metrics");
    assert_eq!(metric_value(&metrics, "credlet_csi_volumes"), Some(1.0));
    let expiry =
        metric_value(&metrics, "credlet_csi_certificate_expiry_seconds").expect("expiry gauge");
    assert!(
        expiry > 3000.0,
        "the 1 h certificate is the earliest now: {expiry}"
    );

    drop(csi);
    let status = env.stop().await;
    assert!(status.success(), "exit: {status:?}");
    assert!(
        http_get(addr, "/healthz").is_err(),
        "the port closes on shutdown"
    );
}
