//! gRPC over Unix sockets (CRI clients for tests), and a tiny CRI probe the
//! harness uses to wait until containerd's CRI plugin knows an image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// The CRI v1 client the tests use: the RuntimeService and ImageService
/// calls and messages they need (`test-util/proto/cri.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

/// A tonic channel to a gRPC server on a Unix socket (e.g. containerd's CRI
/// socket, or credlet's proxy socket). Use with [`v1::runtime_service_client::RuntimeServiceClient::new`] and the image client.
pub async fn unix_channel(socket: impl AsRef<Path>) -> Result<Channel> {
    let socket: PathBuf = socket.as_ref().to_path_buf();
    // The URI is required by tonic but unused by the connector.
    Endpoint::try_from("http://[::1]:0")?
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| "connect gRPC over Unix socket")
}

/// CRI `ImageStatus(image)`: the image id if the runtime reports it present.
pub async fn cri_image_id(channel: Channel, image: &str) -> Result<Option<String>> {
    let request = v1::ImageStatusRequest {
        image: Some(v1::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        verbose: false,
    };
    let answer = v1::image_service_client::ImageServiceClient::new(channel)
        .image_status(request)
        .await?;
    Ok(answer.into_inner().image.map(|i| i.id))
}

/// Blocks until the CRI server on `socket` reports `image` present (the CRI
/// plugin learns about `ctr`-imported images asynchronously, from events).
pub(crate) fn wait_for_cri_image(socket: &Path, image: &str, timeout: Duration) -> Result<String> {
    let socket = socket.to_path_buf();
    let image = image.to_string();
    // Own thread and runtime: callers may be inside a tokio runtime.
    std::thread::spawn(move || -> Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let deadline = Instant::now() + timeout;
            loop {
                let last = match async { cri_image_id(unix_channel(&socket).await?, &image).await }
                    .await
                {
                    Ok(Some(id)) => return Ok(id),
                    Ok(None) => "absent".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                if Instant::now() > deadline {
                    bail!("CRI did not report {image} within {timeout:?}: {last}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("CRI probe thread panicked"))?
}
