//! `Debug` for the messages that carry secrets (pull credentials, service
//! account tokens): the secret fields print as `<redacted>` (or as empty),
//! so no log line or panic message can leak them.

use std::fmt;

fn secret(value: &str) -> &'static str {
    if value.is_empty() { "" } else { "<redacted>" }
}

impl fmt::Debug for crate::cri::AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &secret(&self.password))
            .field("auth", &secret(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &secret(&self.identity_token))
            .field("registry_token", &secret(&self.registry_token))
            .finish()
    }
}

impl fmt::Debug for crate::ca::IssueAgentCertificateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueAgentCertificateRequest")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .field("token", &secret(&self.token))
            .field("node_name", &self.node_name)
            .finish()
    }
}

impl fmt::Debug for crate::ca::IssuePodCertificateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuePodCertificateRequest")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .field("token", &secret(&self.token))
            .field("pod_namespace", &self.pod_namespace)
            .field("pod_name", &self.pod_name)
            .field("pod_uid", &self.pod_uid)
            .field("service_account", &self.service_account)
            .field("dns_name_templates", &self.dns_name_templates)
            .field("ip_addresses", &self.ip_addresses)
            .field("common_name_template", &self.common_name_template)
            .field("duration_seconds", &self.duration_seconds)
            .field("renew_before_seconds", &self.renew_before_seconds)
            .field("renew_before_percent", &self.renew_before_percent)
            .field("spiffe_id_template", &self.spiffe_id_template)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_never_print() {
        let auth = crate::cri::AuthConfig {
            username: "alice".into(),
            password: "hunter2".into(),
            auth: "YWxpY2U6aHVudGVyMg==".into(),
            identity_token: "idtok".into(),
            ..Default::default()
        };
        let printed = format!("{auth:?}");
        assert!(printed.contains("alice"), "{printed}");
        for secret in ["hunter2", "YWxpY2U6aHVudGVyMg==", "idtok"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        let pod = crate::ca::IssuePodCertificateRequest {
            token: "eyJhbGciOi.payload.signature".into(),
            pod_name: "web-0".into(),
            ..Default::default()
        };
        let printed = format!("{pod:?}");
        assert!(
            printed.contains("web-0") && !printed.contains("eyJ"),
            "{printed}"
        );
        let agent = crate::ca::IssueAgentCertificateRequest {
            token: "eyJhbGciOi.payload.signature".into(),
            ..Default::default()
        };
        assert!(!format!("{agent:?}").contains("eyJ"));
    }
}
