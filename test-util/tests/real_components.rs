//! Proves the harness against the real components: two registries (htpasswd
//! and token auth) and a private containerd driven over CRI.
//!
//! Needs root and the packages of `test-util/install-deps.sh`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use credlet_test_util::cri::v1::image_service_client::ImageServiceClient;
use credlet_test_util::cri::v1::runtime_service_client::RuntimeServiceClient;
use credlet_test_util::cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, ImageStatusRequest, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListContainersRequest, ListImagesRequest, ListPodSandboxRequest,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use credlet_test_util::{
    ANYONE, Containerd, DOCKER_MANIFEST, Grant, PushedImage, Registry, RegistryClient,
    build_and_push_image, mount_points_below, unix_channel,
};
use tonic::Code;
use tonic::transport::Channel;

fn keep() -> bool {
    std::env::var_os("CREDLET_TEST_KEEP").is_some()
}

const ALICE: (&str, &str) = ("alice", "alice-secret");
const CAROL: (&str, &str) = ("carol", "carol-secret");

fn wrong(c: (&'static str, &'static str)) -> (&'static str, &'static str) {
    (c.0, "not-the-password")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_answer_manifest_head_by_credentials() -> Result<()> {
    let t0 = Instant::now();

    // --- htpasswd registry -------------------------------------------------
    let basic = Registry::start_basic_auth(&[ALICE, CAROL])?;
    let img = build_and_push_image(&basic, "team/app", "v1", ALICE)?;
    ensure!(img.digest.starts_with("sha256:"), "digest {}", img.digest);
    let client = RegistryClient::new(&basic)?;

    let anon = client.head_manifest(&img.name, &img.digest, None).await?;
    assert_eq!(anon.status, 401, "{anon:?}");
    assert!(
        anon.challenge
            .as_deref()
            .unwrap_or("")
            .starts_with("Basic "),
        "{anon:?}"
    );

    let bad = client
        .head_manifest(&img.name, &img.digest, Some(wrong(ALICE)))
        .await?;
    assert_eq!(bad.status, 401, "{bad:?}");

    let good = client
        .head_manifest(&img.name, &img.digest, Some(ALICE))
        .await?;
    assert_eq!(good.status, 200, "{good:?}");
    assert_eq!(good.digest.as_deref(), Some(img.digest.as_str()));
    // By tag too.
    let by_tag = client.head_manifest(&img.name, "v1", Some(ALICE)).await?;
    assert_eq!(by_tag.digest.as_deref(), Some(img.digest.as_str()));
    // htpasswd has no per-repository ACL: every valid user reads everything.
    assert_eq!(
        client
            .head_manifest(&img.name, &img.digest, Some(CAROL))
            .await?
            .status,
        200
    );

    // DESIGN §4: a Docker-only Accept does not find an OCI manifest.
    let auth = format!("Basic {}", b64(&format!("{}:{}", ALICE.0, ALICE.1)));
    let docker_only = client
        .request(
            basic.addr(),
            hyper::Method::HEAD,
            &format!("/v2/{}/manifests/{}", img.name, img.digest),
            &[
                ("accept", DOCKER_MANIFEST.to_string()),
                ("authorization", auth),
            ],
            None,
        )
        .await?;
    assert_eq!(
        docker_only.status, 404,
        "Docker-only Accept on an OCI manifest"
    );

    // The access log sees the HEADs (used later to count registry requests).
    let heads = basic
        .access_log()
        .into_iter()
        .filter(|e| e.method == "HEAD" && e.path.contains("/manifests/"))
        .count();
    assert!(heads >= 8, "access log HEADs: {heads}");

    // --- token registry ----------------------------------------------------
    let token = Registry::start_token_auth(
        &[ALICE, CAROL],
        &[
            Grant::new(ALICE.0, "team/app", &["pull", "push"]),
            Grant::new(ALICE.0, "public/base", &["pull", "push"]),
            Grant::new(ANYONE, "public/base", &["pull"]),
        ],
    )?;
    let timg = build_and_push_image(&token, "team/app", "v1", ALICE)?;
    let pimg = build_and_push_image(&token, "public/base", "v1", ALICE)?;
    assert_ne!(timg.digest, img.digest, "images differ per registry/repo");
    let tclient = RegistryClient::new(&token)?;

    let anon = tclient
        .head_manifest(&timg.name, &timg.digest, None)
        .await?;
    assert_eq!(
        (anon.token_status, anon.status),
        (Some(200), 401),
        "{anon:?}"
    );
    let ch = anon.challenge.clone().unwrap_or_default();
    assert!(
        ch.starts_with("Bearer ") && ch.contains("realm=") && ch.contains("scope="),
        "{ch}"
    );

    let bad = tclient
        .head_manifest(&timg.name, &timg.digest, Some(wrong(ALICE)))
        .await?;
    assert_eq!((bad.token_status, bad.status), (Some(401), 401), "{bad:?}");

    let good = tclient
        .head_manifest(&timg.name, &timg.digest, Some(ALICE))
        .await?;
    assert_eq!(
        (good.token_status, good.status),
        (Some(200), 200),
        "{good:?}"
    );
    assert_eq!(good.digest.as_deref(), Some(timg.digest.as_str()));

    // DESIGN §4: a valid user without access still gets a 200 token (empty
    // access); only the manifest answer proves access.
    let carol = tclient
        .head_manifest(&timg.name, &timg.digest, Some(CAROL))
        .await?;
    assert_eq!(
        (carol.token_status, carol.status),
        (Some(200), 401),
        "{carol:?}"
    );

    // A public repository: anonymous and any valid user read it.
    let anon_pub = tclient
        .head_manifest(&pimg.name, &pimg.digest, None)
        .await?;
    assert_eq!(
        (anon_pub.token_status, anon_pub.status),
        (Some(200), 200),
        "{anon_pub:?}"
    );
    assert_eq!(
        tclient
            .head_manifest(&pimg.name, &pimg.digest, Some(CAROL))
            .await?
            .status,
        200
    );

    let log = token.token_requests();
    assert!(log.iter().any(
        |r| r.user.as_deref() == Some("alice") && r.granted.iter().any(|g| g.contains("push"))
    ));
    assert!(
        log.iter()
            .any(|r| r.status == 401 && r.user.as_deref() == Some("alice"))
    );
    assert!(
        log.iter()
            .any(|r| r.user.as_deref() == Some("carol") && r.granted.is_empty())
    );

    // Stop/restart keep storage and address.
    let mut token = token;
    token.stop();
    assert!(
        tclient
            .head_manifest(&timg.name, &timg.digest, Some(ALICE))
            .await
            .is_err()
    );
    token.restart()?;
    assert_eq!(
        tclient
            .head_manifest(&timg.name, &timg.digest, Some(ALICE))
            .await?
            .status,
        200
    );

    let dirs = [basic.dir().to_path_buf(), token.dir().to_path_buf()];
    drop((basic, token));
    for d in dirs {
        ensure!(keep() || !d.exists(), "{} left behind", d.display());
    }
    eprintln!("registries test body took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_with_credentials_and_runs_pods() -> Result<()> {
    let t0 = Instant::now();
    let basic = Registry::start_basic_auth(&[ALICE])?;
    let token = Registry::start_token_auth(
        &[ALICE, CAROL],
        &[Grant::new(ALICE.0, "team/app", &["pull", "push"])],
    )?;
    let bimg = build_and_push_image(&basic, "team/app", "v1", ALICE)?;
    let timg = build_and_push_image(&token, "team/app", "v1", ALICE)?;
    let t_push = t0.elapsed();

    let containerd = Containerd::start_with(&[&basic, &token])?;
    let t_ctrd = t0.elapsed();
    let ctrd_dir: PathBuf = containerd.dir().to_path_buf();
    let channel = unix_channel(containerd.cri_socket()).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut im = ImageServiceClient::new(channel.clone());

    let v = rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(v.runtime_name, "containerd");
    assert_eq!(v.runtime_api_version, "v1");

    // The sandbox image was imported, not pulled.
    assert!(image_id(&mut im, containerd.pause_image()).await?.is_some());

    for (reg, img) in [(&basic, &bimg), (&token, &timg)] {
        let what = format!("{} ({:?})", img.reference, reg.auth());
        assert_eq!(
            image_id(&mut im, &img.reference).await?,
            None,
            "{what}: absent before pull"
        );

        let err = pull(&mut im, img, Some(wrong(ALICE)))
            .await
            .expect_err("wrong password pulls");
        assert_eq!(err.code(), Code::Unknown, "{what}: {err:?}");
        assert!(
            err.message().contains("401 Unauthorized"),
            "{what}: {}",
            err.message()
        );
        eprintln!("wrong password: {}", err.message());

        let err = pull(&mut im, img, None).await.expect_err("anonymous pull");
        assert_eq!(err.code(), Code::Unknown, "{what}: {err:?}");
        eprintln!("anonymous: {}", err.message());

        let image_ref = pull(&mut im, img, Some(ALICE))
            .await
            .with_context(|| what.clone())?;
        assert_eq!(
            image_ref, img.config_digest,
            "{what}: CRI image ref is the config digest"
        );
        let status = im
            .image_status(ImageStatusRequest {
                image: Some(spec(&img.reference)),
                verbose: false,
            })
            .await?
            .into_inner()
            .image
            .context("present after pull")?;
        assert_eq!(status.id, img.config_digest);
        assert!(
            status.repo_digests.contains(&img.digest_reference()),
            "{what}: {:?}",
            status.repo_digests
        );
        assert!(
            status.repo_tags.contains(&img.reference),
            "{what}: {:?}",
            status.repo_tags
        );
        // Present now: a pull with bad credentials is still refused (containerd
        // resolves the manifest again on every PullImage).
        let err = pull(&mut im, img, Some(wrong(ALICE)))
            .await
            .expect_err("cached + wrong password");
        assert!(
            err.message().contains("401 Unauthorized"),
            "{what}: {}",
            err.message()
        );
    }
    // The valid-but-unauthorized user of the token registry: token 200,
    // manifest 401, so containerd fails the pull too.
    let err = pull(&mut im, &timg, Some(CAROL))
        .await
        .expect_err("carol has no grant");
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    eprintln!("no grant: {}", err.message());
    // containerd tries the OAuth2 password grant (POST) first when it has a
    // password, and falls back to GET with Basic on 401.
    let tlog = token.token_requests();
    assert!(
        tlog.iter()
            .any(|r| r.method == "POST" && r.status == 200 && r.user.as_deref() == Some("alice"))
    );
    assert!(tlog.iter().any(|r| r.method == "POST" && r.status == 401));
    assert!(tlog.iter().any(|r| r.method == "GET" && r.status == 401));

    let images = im
        .list_images(ListImagesRequest { filter: None })
        .await?
        .into_inner()
        .images;
    for id in [&bimg.config_digest, &timg.config_digest] {
        assert!(images.iter().any(|i| &i.id == id), "ListImages lacks {id}");
    }
    assert!(
        images
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t == containerd.pause_image()))
    );
    let t_pulls = t0.elapsed();

    run_pod(&mut rt, &bimg).await?;
    let t_pod = t0.elapsed();

    // Runtime down → Unavailable; after a restart the same channel recovers
    // and the images are still there.
    let mut containerd = containerd;
    containerd.stop();
    let err = rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect_err("containerd is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    containerd.restart()?;
    let mut recovered = false;
    for _ in 0..50 {
        if rt
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "CRI did not come back after restart");
    assert_eq!(
        image_id(&mut im, &bimg.reference).await?,
        Some(bimg.config_digest.clone())
    );
    let t_restart = t0.elapsed();

    drop(rt);
    drop(im);
    drop(channel);
    drop(containerd);
    ensure!(
        mount_points_below(&ctrd_dir).is_empty(),
        "mounts left below {}",
        ctrd_dir.display()
    );
    ensure!(
        keep() || !ctrd_dir.exists(),
        "{} left behind",
        ctrd_dir.display()
    );
    eprintln!(
        "timings: registries+push {t_push:?}, containerd up {:?}, pulls {:?}, pod lifecycle {:?}, \
         containerd stop+restart {:?}, cleanup {:?}",
        t_ctrd - t_push,
        t_pulls - t_ctrd,
        t_pod - t_pulls,
        t_restart - t_pod,
        t0.elapsed() - t_restart
    );
    Ok(())
}

/// A test that fails half-way leaves a running pod: dropping the guard must
/// still remove every container process, shim, mount and socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_containerd_with_running_pod_cleans_up() -> Result<()> {
    let containerd = Containerd::start()?;
    let dir = containerd.dir().to_path_buf();
    let channel = unix_channel(containerd.cri_socket()).await?;
    let mut rt = RuntimeServiceClient::new(channel);
    let sandbox_config = host_network_sandbox("abandoned");
    let pod_id = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let ctr_id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(spec(containerd.pause_image())),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: ctr_id.clone(),
    })
    .await?;
    let ids = [pod_id.as_str(), ctr_id.as_str()];
    let rooted = processes_in_cgroups_of(&ids);
    assert_eq!(rooted.len(), 2, "sandbox + container processes: {rooted:?}");
    assert!(!processes_naming(&dir).is_empty(), "containerd and shim");
    assert!(!mount_points_below(&dir).is_empty());
    let sockets: Vec<PathBuf> =
        std::fs::read_dir(dir.join("state/io.containerd.runtime.v2.task/k8s.io"))?
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("address")).ok())
            .map(|a| PathBuf::from(a.trim().trim_start_matches("unix://")))
            .collect();
    assert!(
        !sockets.is_empty() && sockets.iter().all(|s| s.exists()),
        "{sockets:?}"
    );

    drop(rt);
    drop(containerd);
    assert_eq!(
        processes_in_cgroups_of(&ids),
        Vec::<u32>::new(),
        "container processes left"
    );
    assert_eq!(
        processes_naming(&dir),
        Vec::<u32>::new(),
        "containerd/shim left"
    );
    assert!(mount_points_below(&dir).is_empty(), "mounts left");
    assert!(
        sockets.iter().all(|s| !s.exists()),
        "shim sockets left: {sockets:?}"
    );
    ensure!(keep() || !dir.exists(), "{} left behind", dir.display());
    Ok(())
}

/// A harness directory whose owner died (SIGKILLed test binary) is swept at
/// the next start: its processes killed, its mounts removed, it deleted.
#[test]
fn stale_directories_of_dead_owners_are_swept() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("credlet-tu-fake-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("mnt"))?;
    // pid_max is at most 2^22: this pid cannot exist.
    std::fs::write(dir.join(".owner"), "99999999 1")?;
    std::fs::write(dir.join("file"), "")?;
    let mut child = std::process::Command::new("tail")
        .arg("-f")
        .arg(dir.join("file"))
        .spawn()?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(dir.join("mnt"))
        .status()?;
    ensure!(status.success(), "mount tmpfs");
    assert_eq!(mount_points_below(&dir).len(), 1);

    credlet_test_util::sweep_stale();

    let waited = child.wait()?; // reaped: it was killed
    assert!(!waited.success());
    assert!(mount_points_below(&dir).is_empty());
    assert!(!dir.exists());
    Ok(())
}

fn host_network_sandbox(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "team".into(),
            attempt: 0,
        }),
        // No hostname: with a host network namespace the pod also shares the
        // host's UTS namespace, and runc refuses to set a hostname there.
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
}

/// Processes in the cgroup of one of the container ids (containerd's
/// default cgroups path is `/k8s.io/<id>`).
fn processes_in_cgroups_of(ids: &[&str]) -> Vec<u32> {
    pids()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                .is_ok_and(|c| ids.iter().any(|id| c.contains(&format!("/k8s.io/{id}"))))
        })
        .collect()
}

/// Processes with `dir` in an argument (containerd, shims).
fn processes_naming(dir: &std::path::Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    pids()
        .filter(|p| std::process::id() != *p)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// RunPodSandbox (host network, no hostname) → CreateContainer → Start →
/// Stop/Remove → StopPodSandbox/RemovePodSandbox.
async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, img: &PushedImage) -> Result<()> {
    let sandbox_config = host_network_sandbox("pod-a");
    let pod_id = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;

    let created = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(spec(&img.reference)),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: created.clone(),
    })
    .await
    .context("StartContainer")?;
    let status = rt
        .container_status(ContainerStatusRequest {
            container_id: created.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("container status")?;
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{status:?}"
    );
    // containerd 1.6 reports the repo digest here, not the image id.
    assert_eq!(status.image_ref, img.digest_reference());

    // Our pause binary exits 0 on SIGTERM: a graceful stop, no SIGKILL.
    rt.stop_container(StopContainerRequest {
        container_id: created.clone(),
        timeout: 10,
    })
    .await
    .context("StopContainer")?;
    let status = rt
        .container_status(ContainerStatusRequest {
            container_id: created.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("container status")?;
    assert_eq!(
        status.state,
        ContainerState::ContainerExited as i32,
        "{status:?}"
    );
    assert_eq!(status.exit_code, 0, "{status:?}");
    rt.remove_container(RemoveContainerRequest {
        container_id: created,
    })
    .await
    .context("RemoveContainer")?;
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    })
    .await
    .context("StopPodSandbox")?;
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id,
    })
    .await
    .context("RemovePodSandbox")?;
    let left = rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    assert!(left.is_empty(), "{left:?}");
    let left = rt
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

async fn image_id(im: &mut ImageServiceClient<Channel>, image: &str) -> Result<Option<String>> {
    let resp = im
        .image_status(ImageStatusRequest {
            image: Some(spec(image)),
            verbose: false,
        })
        .await?;
    Ok(resp.into_inner().image.map(|i| i.id))
}

async fn pull(
    im: &mut ImageServiceClient<Channel>,
    img: &PushedImage,
    creds: Option<(&str, &str)>,
) -> std::result::Result<String, tonic::Status> {
    let resp = im
        .pull_image(PullImageRequest {
            image: Some(spec(&img.reference)),
            auth: creds.map(|(u, p)| AuthConfig {
                username: u.into(),
                password: p.into(),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await?;
    Ok(resp.into_inner().image_ref)
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
