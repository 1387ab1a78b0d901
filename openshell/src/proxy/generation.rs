//! One policy generation as the proxy enforces it: the compiled network policy, its revision,
//! and the `allowed_ips` index the policy DNS uses to filter private answers.

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;

use crate::policy::{self, AddressClass, CompiledPolicy, HostPattern, Policy};

use super::ProxyError;

/// A network policy compiled for the proxy but not yet tied to a revision, so that a reload can
/// compile while it records the revision.
#[derive(Debug)]
pub struct CompiledNetwork {
    policy: CompiledPolicy,
    allowances: Vec<(HostPattern, Vec<IpNet>)>,
}

impl CompiledNetwork {
    /// Compiles a validated policy.
    #[must_use]
    pub fn new(policy: &Policy) -> Self {
        let allowances = policy
            .network
            .values()
            .flat_map(|block| &block.endpoints)
            .filter(|endpoint| !endpoint.allowed_ips.is_empty())
            .map(|endpoint| (endpoint.host.clone(), endpoint.allowed_ips.clone()))
            .collect();
        Self {
            policy: policy.compile(),
            allowances,
        }
    }
}

/// A compiled network policy in force for one sandbox. Immutable; a reload builds a new one.
#[derive(Debug)]
pub struct Generation {
    revision: i64,
    policy: Arc<CompiledPolicy>,
    /// Endpoints that list `allowed_ips`: private answers for their hosts are usable.
    allowances: Vec<(HostPattern, Vec<IpNet>)>,
}

impl Generation {
    /// Parses, validates and compiles `text` (named `source` in errors) as revision `revision`.
    pub fn from_text(source: &str, text: &str, revision: i64) -> Result<Self, ProxyError> {
        let policy = policy::parse(source, text).map_err(|errors| ProxyError::InvalidPolicy {
            message: errors.to_string(),
        })?;
        Ok(Self::new(&policy, revision))
    }

    /// Compiles a validated policy.
    #[must_use]
    pub fn new(policy: &Policy, revision: i64) -> Self {
        Self::from_compiled(CompiledNetwork::new(policy), revision)
    }

    /// The generation of revision `revision` from a policy compiled beforehand.
    #[must_use]
    pub fn from_compiled(compiled: CompiledNetwork, revision: i64) -> Self {
        Self {
            revision,
            policy: Arc::new(compiled.policy),
            allowances: compiled.allowances,
        }
    }

    /// The policy revision this generation was built from.
    #[must_use]
    pub const fn revision(&self) -> i64 {
        self.revision
    }

    /// The compiled policy.
    #[must_use]
    pub fn policy(&self) -> &CompiledPolicy {
        &self.policy
    }

    /// The compiled policy, shared (HTTP inspection keeps it for the request it decides).
    #[must_use]
    pub fn shared_policy(&self) -> Arc<CompiledPolicy> {
        Arc::clone(&self.policy)
    }

    /// Whether the policy DNS may hand `ip` to the sandbox as an address of `name`: never for
    /// forbidden addresses, for private ones only when an endpoint matching `name` lists them
    /// in `allowed_ips`.
    #[must_use]
    pub fn may_use_address(&self, name: &str, ip: IpAddr) -> bool {
        match policy::classify(ip) {
            AddressClass::Forbidden(_) => false,
            AddressClass::Public => true,
            AddressClass::Private => {
                let ip = policy::unmap(ip);
                self.allowances
                    .iter()
                    .any(|(host, nets)| host.matches(name) && nets.iter().any(|n| n.contains(&ip)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
version: 1
network_policies:
  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
      - host: internal.example.com
        port: 443
        allowed_ips: ["100.64.0.0/10"]
    binaries:
      - { path: /usr/bin/curl }
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_safety_for_dns_answers() {
        let g = Generation::from_text("p.yaml", POLICY, 3).unwrap();
        assert_eq!(g.revision(), 3);
        assert!(g.may_use_address("pypi.org", ip("198.18.0.10")));
        assert!(!g.may_use_address("pypi.org", ip("127.0.0.1")));
        assert!(!g.may_use_address("pypi.org", ip("169.254.169.254")));
        assert!(!g.may_use_address("pypi.org", ip("::1")));
        assert!(!g.may_use_address("pypi.org", ip("100.64.1.2")));
        assert!(!g.may_use_address("pypi.org", ip("10.0.0.1")));
        assert!(g.may_use_address("internal.example.com", ip("100.64.1.2")));
        assert!(g.may_use_address("internal.example.com", ip("::ffff:100.64.1.2")));
        assert!(!g.may_use_address("internal.example.com", ip("10.0.0.1")));
    }

    #[test]
    fn rest_endpoints_load_for_inspection() {
        let text = r#"version: 1
network_policies:
  my_api:
    endpoints:
      - host: api.example.com
        port: 443
        protocol: rest
        access: read-only
    binaries:
      - { path: /usr/bin/curl }
"#;
        let g = Generation::from_text("my-policy.yaml", text, 1).unwrap();
        let query = policy::ConnectionQuery {
            host: "api.example.com",
            port: 443,
            binary: std::path::Path::new("/usr/bin/curl"),
            ancestors: &[],
            dest_ip: Some(ip("198.18.0.10")),
        };
        let decision = g.policy().decide_connection(&query);
        assert_eq!(decision.verdict, policy::Verdict::Allow);
        assert_eq!(
            decision.inspection,
            policy::Inspection::Http {
                terminate_tls: true
            }
        );
        let get = policy::HttpRequestQuery {
            method: "GET",
            target: "/x",
        };
        let delete = policy::HttpRequestQuery {
            method: "DELETE",
            target: "/x",
        };
        assert!(g.shared_policy().decide_request(&query, &get).is_allowed());
        assert!(
            !g.shared_policy()
                .decide_request(&query, &delete)
                .is_allowed()
        );
    }

    #[test]
    fn invalid_policy_keeps_the_validation_message() {
        let err = Generation::from_text("p.yaml", "version: 2\n", 1).unwrap_err();
        assert!(err.to_string().contains("p.yaml:1:"), "{err}");
    }
}
