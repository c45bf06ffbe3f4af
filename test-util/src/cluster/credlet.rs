//! credlet installed into a [`Cluster`] the way `docs/operations.md` says:
//! the image made available to the node, the CA key Secret and trust
//! ConfigMap created, then `kubectl apply -k` of an overlay over
//! `deploy/overlays/agent-and-ca`.
//!
//! The overlay (`<cluster>/credlet-overlay/kustomization.yaml`, kept for
//! reading) changes only what this node lacks:
//! - the image: the locally built one instead of the published tag;
//! - the network: there is no Service network, so the CA and the agent run
//!   with `hostNetwork` on the node's address, the agent resolves the CA's
//!   Service name to it (`hostAliases`), the CA reaches the API server at
//!   127.0.0.1 (`KUBERNETES_SERVICE_HOST`), and every listener binds the
//!   node's address instead of `0.0.0.0`; one CA replica, replaced by
//!   recreating it (two would share the port);
//! - the paths: the kubelet's root and the agent's state directory live
//!   below the cluster directory instead of `/var/lib/kubelet` and
//!   `/run/credlet`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};

use super::images::binary_files;
use super::{Cluster, Programs};
use crate::image::ImageSpec;

/// The namespace `deploy/` installs into.
pub const NAMESPACE: &str = "credlet-system";
/// The image name the node has credlet under.
pub const IMAGE: &str = "credlet.test/credlet:dev";
const PUBLISHED_IMAGE: &str = "ghcr.io/credlet/credlet";

/// How credlet is installed.
#[derive(Debug, Clone)]
pub struct CredletOptions {
    /// The `credlet` binary to put in the image.
    pub binary: PathBuf,
    /// Extra arguments for `credlet ca` (after the manifest's).
    pub ca_args: Vec<String>,
}

/// What [`Cluster::install_credlet`] created.
#[derive(Debug, Clone)]
pub struct CredletInstall {
    /// The CA's root certificate (PEM), as in the Secret and ConfigMap.
    pub ca_pem: String,
    /// What was applied: the kustomize overlay directory, or the Helm
    /// values file.
    pub applied: PathBuf,
}

impl Cluster {
    /// Builds the credlet image from `opts.binary`, imports it into the
    /// node's containerd, creates the CA key Secret and trust ConfigMap,
    /// applies `deploy/overlays/agent-and-ca` through the overlay described
    /// in the module documentation, and waits for the agent and the CA to
    /// be ready.
    pub fn install_credlet(&self, opts: &CredletOptions) -> Result<CredletInstall> {
        let d = self.dir().join("credlet");
        fs::create_dir_all(&d)?;

        // The image, imported: the node has it without a pull.
        let spec = ImageSpec {
            files: binary_files(&[(&opts.binary, "/usr/local/bin/credlet")])?,
            entrypoint: vec!["/usr/local/bin/credlet".into()],
            env: vec!["PATH=/usr/local/bin".into()],
            uncompressed: true,
            ..Default::default()
        };
        self.load_image(IMAGE, &spec)?;

        let ca_pem = self.create_ca_material(&d)?;

        let overlay = self.dir().join("credlet-overlay");
        fs::create_dir_all(&overlay)?;
        let kustomization = self.credlet_overlay(opts)?;
        fs::write(overlay.join("kustomization.yaml"), kustomization)?;
        self.kubectl(&["apply", "-k", &overlay.to_string_lossy()])
            .context("kubectl apply -k the credlet overlay")?;
        self.wait_for_credlet()?;
        Ok(CredletInstall {
            ca_pem,
            applied: overlay,
        })
    }

    /// The namespace, the CA key Secret and the trust ConfigMap, made as
    /// docs/operations.md says; returns the root's PEM. The key file exists
    /// only while kubectl reads it.
    fn create_ca_material(&self, work: &Path) -> Result<String> {
        let (ca_pem, key_pem) = new_credlet_root("credlet root CA")?;
        let key_file = work.join("ca.key");
        let cert_file = work.join("ca.crt");
        fs::write(&cert_file, &ca_pem)?;
        fs::write(&key_file, &key_pem)?;
        let ns = NAMESPACE;
        let created = self
            .kubectl(&["create", "namespace", ns])
            .and_then(|_| {
                self.kubectl(&[
                    "-n",
                    ns,
                    "create",
                    "secret",
                    "generic",
                    "credlet-ca-key",
                    &format!("--from-file=tls.crt={}", cert_file.display()),
                    &format!("--from-file=tls.key={}", key_file.display()),
                ])
            })
            .and_then(|_| {
                self.kubectl(&[
                    "-n",
                    ns,
                    "create",
                    "configmap",
                    "credlet-ca-trust",
                    &format!("--from-file=ca.crt={}", cert_file.display()),
                ])
            });
        let _ = fs::remove_file(&key_file);
        created?;
        Ok(ca_pem)
    }

    /// Removes what [`Cluster::install_credlet`] applied, its namespace
    /// included, and waits until it is gone.
    pub fn uninstall_credlet(&self, install: &CredletInstall) -> Result<()> {
        self.kubectl(&[
            "delete",
            "-k",
            &install.applied.to_string_lossy(),
            "--wait=true",
            "--timeout=180s",
        ])
        .context("kubectl delete -k the credlet overlay")?;
        Ok(())
    }

    /// Installs credlet with the Helm chart `deploy/helm/credlet` (release
    /// `credlet` in [`NAMESPACE`]), with the same node adjustments as the
    /// kustomize overlay given as chart values, and waits for it. The image
    /// must have been loaded ([`Cluster::install_credlet`] does).
    pub fn install_credlet_helm(&self, opts: &CredletOptions) -> Result<CredletInstall> {
        let d = self.dir().join("credlet-helm");
        fs::create_dir_all(&d)?;
        let ca_pem = self.create_ca_material(&d)?;
        let ip = self.node_ip().to_string();
        let (name, tag) = IMAGE.rsplit_once(':').unwrap_or((IMAGE, "latest"));
        let values = json!({
            "image": {"repository": name, "tag": tag, "pullPolicy": "IfNotPresent"},
            "agent": {
                "kubeletDir": self.kubelet_root(),
                "stateDir": d.join("agent-state"),
                "hostNetwork": true,
                "hostAliases": [{"ip": ip, "hostnames": [format!("credlet-ca.{NAMESPACE}.svc")]}],
                "healthListen": format!("{ip}:9808"),
            },
            "ca": {
                "replicas": 1,
                "hostNetwork": true,
                "listenAddress": ip,
                "extraEnv": [
                    {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": self.api_port().to_string()},
                ],
                "extraArgs": opts.ca_args,
            },
        });
        let values_file = d.join("values.json");
        fs::write(&values_file, serde_json::to_string_pretty(&values)?)?;
        self.helm(&[
            "install",
            "credlet",
            &deploy_dir().join("helm/credlet").to_string_lossy(),
            "--namespace",
            NAMESPACE,
            "--values",
            &values_file.to_string_lossy(),
        ])
        .context("helm install")?;
        self.wait_for_credlet()?;
        Ok(CredletInstall {
            ca_pem,
            applied: values_file,
        })
    }

    /// Runs helm v4 (built like the other programs) with the admin
    /// kubeconfig.
    pub fn helm(&self, args: &[&str]) -> Result<std::process::Output> {
        let helm = Programs::helm()?;
        crate::process::run(
            std::process::Command::new(helm)
                .env("KUBECONFIG", self.kubeconfig())
                .env("HELM_CACHE_HOME", self.dir().join("helm/cache"))
                .env("HELM_CONFIG_HOME", self.dir().join("helm/config"))
                .env("HELM_DATA_HOME", self.dir().join("helm/data"))
                .args(args),
        )
    }

    /// The overlay's kustomization: `deploy/overlays/agent-and-ca` plus the
    /// node's adjustments, computed from the rendered manifests (so the
    /// overlay follows whatever `deploy/` says).
    fn credlet_overlay(&self, opts: &CredletOptions) -> Result<String> {
        let base = deploy_dir().join("overlays/agent-and-ca");
        let rendered = self
            .kubectl(&["kustomize", &base.to_string_lossy()])
            .context("render deploy/overlays/agent-and-ca")?;
        let objects = yaml_documents_as_json(self, &rendered.stdout)?;
        let find = |kind: &str, name: &str| -> Result<&Value> {
            objects
                .iter()
                .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
                .with_context(|| format!("deploy/ renders no {kind} {name}"))
        };
        let agent = &find("DaemonSet", "credlet-agent")?["spec"]["template"]["spec"];
        let ca = &find("Deployment", "credlet-ca")?["spec"]["template"]["spec"];
        let ip = self.node_ip().to_string();
        let root = self.kubelet_root().to_string_lossy().into_owned();
        let state = self.dir().join("credlet/agent-state");
        let map_path = |p: &str| -> String {
            if let Some(rest) = p.strip_prefix("/var/lib/kubelet") {
                format!("{root}{rest}")
            } else if let Some(rest) = p.strip_prefix("unix:///var/lib/kubelet") {
                format!("unix://{root}{rest}")
            } else {
                p.to_string()
            }
        };

        let mut env = agent["containers"][0]["env"].clone();
        for e in env.as_array_mut().context("agent env")? {
            if let Some(v) = e["value"].as_str() {
                let v = if e["name"] == "CREDLET_HEALTH_LISTEN" {
                    v.replace("0.0.0.0", &ip)
                } else {
                    map_path(v)
                };
                e["value"] = json!(v);
            }
        }
        let mut mounts = agent["containers"][0]["volumeMounts"].clone();
        for m in mounts.as_array_mut().context("agent volumeMounts")? {
            let p = m["mountPath"].as_str().unwrap_or_default().to_string();
            m["mountPath"] = json!(map_path(&p));
        }
        let mut volumes = agent["volumes"].clone();
        for v in volumes.as_array_mut().context("agent volumes")? {
            if let Some(p) = v["hostPath"]["path"].as_str() {
                let p = if p == "/run/credlet" {
                    state.to_string_lossy().into_owned()
                } else {
                    map_path(p)
                };
                v["hostPath"]["path"] = json!(p);
            }
        }
        let ca_host = env
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == "CREDLET_CA_URL"))
            .and_then(|e| e["value"].as_str())
            .and_then(|u| u.strip_prefix("https://"))
            .and_then(|u| u.split(':').next())
            .context("the agent's CREDLET_CA_URL")?
            .to_string();
        let agent_patch = json!([
            {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true},
            {"op": "add", "path": "/spec/template/spec/hostAliases",
             "value": [{"ip": ip, "hostnames": [ca_host]}]},
            {"op": "replace", "path": "/spec/template/spec/containers/0/env", "value": env},
            {"op": "replace", "path": "/spec/template/spec/containers/0/volumeMounts", "value": mounts},
            {"op": "replace", "path": "/spec/template/spec/volumes", "value": volumes},
        ]);

        let mut args: Vec<Value> = ca["containers"][0]["args"]
            .as_array()
            .context("CA args")?
            .iter()
            .map(|a| json!(a.as_str().unwrap_or_default().replace("0.0.0.0", &ip)))
            .collect();
        args.extend(opts.ca_args.iter().map(|a| json!(a)));
        let mut ca_env = ca["containers"][0]["env"].clone();
        let ca_env_list = ca_env.as_array_mut().context("CA env")?;
        ca_env_list.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}));
        ca_env_list
            .push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": self.api_port().to_string()}));
        let ca_patch = json!([
            {"op": "replace", "path": "/spec/replicas", "value": 1},
            // A new pod can not bind the port while the old one holds it.
            {"op": "replace", "path": "/spec/strategy", "value": {"type": "Recreate"}},
            {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true},
            {"op": "replace", "path": "/spec/template/spec/containers/0/args", "value": args},
            {"op": "replace", "path": "/spec/template/spec/containers/0/env", "value": ca_env},
        ]);

        let base_rel = relative_to(&base, &self.dir().join("credlet-overlay"));
        let image_name = IMAGE.split(':').next().unwrap_or(IMAGE);
        let image_tag = IMAGE.rsplit(':').next().unwrap_or("dev");
        Ok(format!(
            "# credlet for the test node: deploy/overlays/agent-and-ca with what this node\n\
             # lacks (test-util/src/cluster/credlet.rs says why).\n\
             apiVersion: kustomize.config.k8s.io/v1beta1\n\
             kind: Kustomization\n\
             resources:\n  - {base_rel}\n\
             images:\n  - name: {PUBLISHED_IMAGE}\n    newName: {image_name}\n    newTag: {image_tag}\n\
             patches:\n\
             \x20 - target: {{group: apps, version: v1, kind: DaemonSet, name: credlet-agent}}\n\
             \x20   patch: '{}'\n\
             \x20 - target: {{group: apps, version: v1, kind: Deployment, name: credlet-ca}}\n\
             \x20   patch: '{}'\n",
            serde_json::to_string(&agent_patch)?.replace('\'', "''"),
            serde_json::to_string(&ca_patch)?.replace('\'', "''"),
        ))
    }

    /// Waits until the agent DaemonSet and the CA Deployment are rolled out.
    pub fn wait_for_credlet(&self) -> Result<()> {
        for what in ["daemonset/credlet-agent", "deployment/credlet-ca"] {
            self.kubectl(&["-n", NAMESPACE, "rollout", "status", what, "--timeout=180s"])
                .with_context(|| {
                    format!(
                        "{what} did not become ready; pods:\n{}",
                        self.describe_credlet_pods()
                    )
                })?;
        }
        Ok(())
    }

    /// `kubectl get pods` and the logs of credlet's pods, for failure messages.
    pub fn describe_credlet_pods(&self) -> String {
        let mut out = String::new();
        for args in [
            vec!["-n", NAMESPACE, "get", "pods", "-o", "wide"],
            vec!["-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp"],
            vec![
                "-n",
                NAMESPACE,
                "logs",
                "-l",
                "app.kubernetes.io/name=credlet-ca",
                "--tail=30",
            ],
            vec![
                "-n",
                NAMESPACE,
                "logs",
                "-l",
                "app.kubernetes.io/name=credlet-agent",
                "--tail=30",
            ],
        ] {
            match self.kubectl(&args) {
                Ok(o) => out.push_str(&String::from_utf8_lossy(&o.stdout)),
                Err(e) => out.push_str(&format!("{e:#}\n")),
            }
        }
        out
    }
}

/// The repository's `deploy/`.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A fresh P-256 root for the CA (what `openssl req -x509` makes in
/// docs/operations.md): (certificate PEM, PKCS#8 key PEM).
pub fn new_credlet_root(common_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generate the credlet CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Parses multi-document YAML through the cluster's kubectl (no YAML parser
/// in this crate): `kubectl create --dry-run=client -o json` of the
/// documents.
fn yaml_documents_as_json(cluster: &Cluster, yaml: &[u8]) -> Result<Vec<Value>> {
    let out = cluster.kubectl_stdin(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        &String::from_utf8_lossy(yaml),
    )?;
    // One JSON object per document, one after the other.
    let mut objects = Vec::new();
    for v in serde_json::Deserializer::from_slice(&out.stdout).into_iter::<Value>() {
        let v = v?;
        match v["kind"].as_str() {
            Some("List") => objects.extend(v["items"].as_array().cloned().unwrap_or_default()),
            _ => objects.push(v),
        }
    }
    Ok(objects)
}

/// `path` relative to `from` (both absolute), as kustomize wants resources.
fn relative_to(path: &Path, from: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let from = from.canonicalize().unwrap_or_else(|_| from.to_path_buf());
    let p: Vec<_> = path.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = p.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/deploy/x"), Path::new("/tmp/c/o")),
            "../../../a/b/deploy/x"
        );
        assert_eq!(relative_to(Path::new("/a/b"), Path::new("/a")), "b");
    }
}
