//! containerd `hosts.toml` files that send pulls for public registry hosts
//! (`registry.k8s.io`, `gcr.io`, ...) to a registry on loopback.
//!
//! Tests that run other people's suites (critest) use image names they can
//! not change. containerd looks up `<config_path>/<host>/hosts.toml` for the
//! host of every reference it resolves; a `[host."https://127.0.0.1:<port>"]`
//! section makes the loopback registry the first (and only reachable) place
//! asked, with the repository path unchanged (`registry.k8s.io/pause:3.9` is
//! `pause:3.9` there). The `server` fallback, which containerd tries when
//! the mirror has no such manifest, is a loopback port nothing listens on
//! ([`CLOSED_SERVER`]): a name the mirror lacks fails fast instead of
//! reaching the internet. containerd 1.6 ignores a file with only `server`,
//! hence the explicit host section.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// The fallback `server` of every mirrored host: port 1 on loopback, where
/// nothing listens (connections are refused at once).
pub const CLOSED_SERVER: &str = "https://127.0.0.1:1";

/// Writes `<certs_d>/<host>/hosts.toml` for each of `hosts`, mirroring it
/// to `mirror` (`127.0.0.1:<port>`, HTTPS) whose TLS certificate `ca_pem`
/// signs. containerd reads these files on every pull, so they can be
/// written before or after it starts.
pub fn write_mirror_hosts(
    certs_d: &Path,
    hosts: &[&str],
    mirror: &str,
    ca_pem: &str,
) -> Result<()> {
    for host in hosts {
        let dir = certs_d.join(host);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let ca = dir.join("mirror-ca.crt");
        fs::write(&ca, ca_pem)?;
        fs::write(dir.join("hosts.toml"), hosts_toml(mirror, &ca))?;
    }
    Ok(())
}

/// The text of one mirrored host's `hosts.toml`.
fn hosts_toml(mirror: &str, ca: &Path) -> String {
    format!(
        "# Pulls go to the loopback registry; the fallback is a closed loopback port.\n\
         server = \"{CLOSED_SERVER}\"\n\
         \n\
         [host.\"https://{mirror}\"]\n  \
           capabilities = [\"pull\", \"resolve\"]\n  \
           ca = \"{}\"\n",
        ca.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_file_names_the_registry_and_a_closed_fallback() {
        let dir = tempfile::tempdir().unwrap();
        write_mirror_hosts(
            dir.path(),
            &["registry.k8s.io", "gcr.io"],
            "127.0.0.1:5000",
            "PEM",
        )
        .unwrap();
        let text = fs::read_to_string(dir.path().join("gcr.io/hosts.toml")).unwrap();
        let ca = dir.path().join("gcr.io/mirror-ca.crt");
        assert_eq!(
            text,
            format!(
                "# Pulls go to the loopback registry; the fallback is a closed loopback port.\n\
                 server = \"https://127.0.0.1:1\"\n\n\
                 [host.\"https://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
                ca.display()
            )
        );
        assert_eq!(fs::read_to_string(ca).unwrap(), "PEM");
        assert!(dir.path().join("registry.k8s.io/hosts.toml").is_file());
    }
}
