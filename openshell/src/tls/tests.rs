use std::sync::Arc;

use super::*;

#[test]
fn leaves_are_cached_per_name_and_chain_to_the_ca() {
    let ca = SandboxCa::generate("t").expect("ca");
    let a = ca.leaf("API.github.com.").expect("leaf");
    let b = ca.leaf("api.github.com").expect("leaf");
    assert!(
        Arc::ptr_eq(&a, &b),
        "the same name must reuse the cached leaf"
    );
    let c = ca.leaf("example.com").expect("leaf");
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(ca.cached_leaves(), 2);
    assert_eq!(a.cert.len(), 2, "leaf then CA");
    assert_eq!(&a.cert[1], ca.cert_der());
}

#[test]
fn a_saved_ca_reloads_with_the_same_certificate() {
    let ca = SandboxCa::generate("t").expect("ca");
    let again = SandboxCa::from_pem("t", ca.cert_pem(), ca.key_pem()).expect("reload");
    assert_eq!(again.cert_der(), ca.cert_der());
    again.leaf("example.com").expect("the reloaded CA signs");
}

#[test]
fn a_bad_saved_key_is_a_clear_error() {
    let ca = SandboxCa::generate("t").expect("ca");
    let err = SandboxCa::from_pem("t", ca.cert_pem(), "not a key").expect_err("bad key");
    assert!(err.to_string().contains("sandbox t"), "{err}");
}

#[test]
fn the_bundle_starts_with_the_sandbox_ca_and_every_variable_names_it() {
    let dir = std::env::temp_dir().join(format!("openshell-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = SandboxCa::generate("t").expect("ca");
    let trust = write_trust_bundle(&ca, &dir).expect("bundle");
    let text = std::fs::read_to_string(&trust.bundle).expect("read");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(text.starts_with(ca.cert_pem()));
    assert!(
        !text.contains("PRIVATE KEY"),
        "the CA key never goes into the bundle"
    );
    let vars: Vec<_> = trust.env.iter().map(|(k, _)| *k).collect();
    assert_eq!(vars, TRUST_ENV_VARS);
    assert!(trust.env.iter().all(|(_, p)| *p == trust.bundle));
    assert_eq!(trust.mount_target, distro_ca_path());
}

#[test]
fn upstream_config_offers_h2_and_http1_and_rejects_a_bad_extra_root() {
    let config = upstream_client_config(&[]).expect("config");
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    let bad = CertificateDer::from(vec![1, 2, 3]);
    let err = upstream_client_config(&[bad]).expect_err("bad root");
    assert!(err.to_string().contains("extra upstream root 0"), "{err}");
}
