//! Webhook settings: operator flags with `AUTHREALM_*` environment fallbacks (flatten
//! [`WebhookConfig`] into the operator's clap command).

use std::net::SocketAddr;
use std::time::Duration;

use super::decide::UnreadyRealmPolicy;

/// Who provides the webhook's serving certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    /// The operator creates and rotates its own CA and serving certificate (in the TLS Secret) and
    /// keeps the MutatingWebhookConfiguration's caBundle current.
    #[default]
    SelfManaged,
    /// Something else (cert-manager) writes `tls.crt`/`tls.key` into the TLS Secret and injects the
    /// caBundle; the operator only loads the certificate, and reloads it when it changes.
    External,
}

/// Flag values are durations like the AuthRealm's ([`GoDuration`]: `90s`, `15m`, `720h`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::crd::GoDuration::new(s).parse()
}

/// Settings of the sidecar-injection webhook.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookConfig {
    /// Serve the sidecar-injection webhook (every replica serves it, leader or not).
    #[arg(id = "webhook-enabled", long = "webhook-enabled", env = "AUTHREALM_WEBHOOK_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// Address of the HTTPS listener the API server calls.
    #[arg(
        id = "webhook-listen",
        long = "webhook-listen",
        env = "AUTHREALM_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:9443"
    )]
    pub listen: SocketAddr,

    /// Namespace of the webhook's TLS Secret (the operator's own namespace).
    #[arg(
        id = "webhook-namespace",
        long = "webhook-namespace",
        env = "POD_NAMESPACE",
        default_value = "authrealm-system"
    )]
    pub namespace: String,

    /// Secret holding the serving certificate (`tls.crt`, `tls.key`, `ca.crt`; in self-managed
    /// mode also the CA keys).
    #[arg(
        id = "webhook-tls-secret",
        long = "webhook-tls-secret",
        env = "AUTHREALM_WEBHOOK_TLS_SECRET",
        default_value = "authrealm-webhook-tls"
    )]
    pub tls_secret: String,

    /// MutatingWebhookConfiguration whose `caBundle` the operator keeps current.
    #[arg(
        id = "webhook-configuration",
        long = "webhook-configuration",
        env = "AUTHREALM_WEBHOOK_CONFIGURATION",
        default_value = "authrealm-sidecar-injector"
    )]
    pub configuration_name: String,

    /// Service in front of the webhook; the serving certificate names `<service>.<namespace>.svc`
    /// (and `.svc.cluster.local`).
    #[arg(
        id = "webhook-service",
        long = "webhook-service",
        env = "AUTHREALM_WEBHOOK_SERVICE",
        default_value = "authrealm-webhook"
    )]
    pub service_name: String,

    /// Extra DNS names or IP addresses for the serving certificate (comma-separated), e.g.
    /// `127.0.0.1` when the API server calls the webhook by URL.
    #[arg(
        id = "webhook-extra-sans",
        long = "webhook-extra-sans",
        env = "AUTHREALM_WEBHOOK_EXTRA_SANS",
        value_delimiter = ','
    )]
    pub extra_sans: Vec<String>,

    /// Who provides the serving certificate.
    #[arg(
        id = "webhook-cert-mode",
        long = "webhook-cert-mode",
        env = "AUTHREALM_WEBHOOK_CERT_MODE",
        value_enum,
        default_value = "self-managed"
    )]
    pub cert_mode: CertMode,

    /// How long a self-managed CA is current. A new CA is published in the caBundle one lifetime
    /// before it signs anything, so the API server always trusts the next CA in advance.
    #[arg(id = "webhook-ca-lifetime", long = "webhook-ca-lifetime", env = "AUTHREALM_WEBHOOK_CA_LIFETIME", default_value = "8760h", value_parser = parse_duration)]
    pub ca_lifetime: Duration,

    /// Lifetime of a self-managed serving certificate; it is replaced when a third of it is left.
    #[arg(id = "webhook-cert-lifetime", long = "webhook-cert-lifetime", env = "AUTHREALM_WEBHOOK_CERT_LIFETIME", default_value = "720h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,

    /// How often the TLS Secret and the caBundle are checked.
    #[arg(id = "webhook-cert-check-interval", long = "webhook-cert-check-interval", env = "AUTHREALM_WEBHOOK_CERT_CHECK_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub cert_check_interval: Duration,

    /// What happens to a Pod naming an AuthRealm that does not exist or whose keys and config are
    /// not in place (`KeysReady` not True; the Redis check does not count): `deny` (refuse it
    /// with a message) or `warn` (admit it without the sidecar, with a warning).
    #[arg(
        id = "webhook-unready-realm-policy",
        long = "webhook-unready-realm-policy",
        env = "AUTHREALM_WEBHOOK_UNREADY_REALM_POLICY",
        value_enum,
        default_value = "deny"
    )]
    pub unready_realm_policy: UnreadyRealmPolicy,

    /// Sidecar image for realms that do not set `spec.sidecar.image`.
    #[arg(id = "sidecar-image", long = "sidecar-image", env = "AUTHREALM_SIDECAR_IMAGE", default_value = concat!("ghcr.io/authrealm/authrealm-sidecar:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    /// imagePullPolicy of the injected sidecar (unset: the Kubernetes default).
    #[arg(id = "sidecar-image-pull-policy", long = "sidecar-image-pull-policy", env = "AUTHREALM_SIDECAR_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: Option<String>,

    /// `reportingInstance` of the webhook's events (the Pod name in a cluster).
    #[arg(id = "webhook-instance", long = "webhook-instance", env = "POD_NAME", default_value = "authrealm-operator")]
    pub instance: String,
}

impl WebhookConfig {
    /// Settings for a webhook the API server calls at `https://127.0.0.1:<port>` (tests and
    /// out-of-cluster runs): listens on an ephemeral loopback port, certificate for 127.0.0.1.
    pub fn loopback(namespace: &str, configuration_name: &str) -> Self {
        WebhookConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            namespace: namespace.into(),
            tls_secret: "authrealm-webhook-tls".into(),
            configuration_name: configuration_name.into(),
            service_name: "authrealm-webhook".into(),
            extra_sans: vec!["127.0.0.1".into(), "localhost".into()],
            cert_mode: CertMode::SelfManaged,
            ca_lifetime: Duration::from_secs(8760 * 3600),
            cert_lifetime: Duration::from_secs(720 * 3600),
            cert_check_interval: Duration::from_secs(60),
            unready_realm_policy: UnreadyRealmPolicy::Deny,
            sidecar_image: concat!("ghcr.io/authrealm/authrealm-sidecar:", env!("CARGO_PKG_VERSION")).into(),
            sidecar_image_pull_policy: None,
            instance: "authrealm-operator".into(),
        }
    }

    /// Checks that the settings fit together: `Err((flag, message))` names the flag (without `--`).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.cert_lifetime.is_zero() || self.ca_lifetime.is_zero() {
            return Err(("webhook-cert-lifetime", "must be longer than 0s, as must --webhook-ca-lifetime".into()));
        }
        if self.cert_lifetime > self.ca_lifetime {
            return Err(("webhook-cert-lifetime", "must not be longer than --webhook-ca-lifetime".into()));
        }
        if self.cert_check_interval.is_zero() || self.cert_check_interval * 3 > self.cert_lifetime {
            return Err((
                "webhook-cert-check-interval",
                "must be longer than 0s and at most a third of --webhook-cert-lifetime".into(),
            ));
        }
        if self.sidecar_image.trim().is_empty() {
            return Err(("sidecar-image", "must not be empty".into()));
        }
        Ok(())
    }

    /// [`check`](Self::check) as one message: `--flag: what is wrong`.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|(flag, message)| format!("--{flag}: {message}"))
    }

    /// Subject alternative names of the serving certificate, sorted and deduplicated.
    pub fn sans(&self) -> Vec<String> {
        let (svc, ns) = (&self.service_name, &self.namespace);
        let mut sans = vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ];
        sans.extend(self.extra_sans.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
        sans.sort();
        sans.dedup();
        sans
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        webhook: WebhookConfig,
    }

    #[test]
    fn defaults_are_valid_and_flags_parse() {
        let cli = Cli::try_parse_from(["op"]).unwrap();
        cli.webhook.validate().unwrap();
        assert_eq!(cli.webhook.unready_realm_policy, UnreadyRealmPolicy::Deny);
        assert_eq!(cli.webhook.cert_mode, CertMode::SelfManaged);
        assert!(cli.webhook.sans().contains(&"authrealm-webhook.authrealm-system.svc".to_owned()));

        let cli = Cli::try_parse_from([
            "op",
            "--webhook-unready-realm-policy=warn",
            "--webhook-cert-mode=external",
            "--webhook-extra-sans=127.0.0.1,localhost",
            "--webhook-cert-lifetime=90s",
            "--webhook-cert-check-interval=10s",
        ])
        .unwrap();
        cli.webhook.validate().unwrap();
        assert_eq!(cli.webhook.unready_realm_policy, UnreadyRealmPolicy::Warn);
        assert_eq!(cli.webhook.cert_lifetime, Duration::from_secs(90));
        assert!(cli.webhook.sans().contains(&"127.0.0.1".to_owned()));
        assert!(Cli::try_parse_from(["op", "--webhook-cert-lifetime=soon"]).is_err());
    }

    #[test]
    fn inconsistent_settings_name_the_flag() {
        let mut c = WebhookConfig::loopback("ns", "cfg");
        c.cert_check_interval = c.cert_lifetime;
        assert!(c.validate().unwrap_err().contains("--webhook-cert-check-interval"));
        let mut c = WebhookConfig::loopback("ns", "cfg");
        c.cert_lifetime = c.ca_lifetime * 2;
        assert!(c.validate().unwrap_err().contains("--webhook-cert-lifetime"));
    }
}
