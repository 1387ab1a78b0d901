//! Each sandbox's certificate authority, as the gateway keeps it.
//!
//! The CA is made when the sandbox is created and saved under `<state dir>/ca/<name>/` (the
//! directory `0700`, the key `0600`, all root's), so that a restarted gateway keeps terminating
//! TLS for the sandboxes it re-adopts. No sandbox can reach that directory: its processes see
//! only the trust bundle (the CA certificate and the system roots), bind-mounted read-only over
//! the distro's default CA path, and the variables of [`crate::tls::TRUST_ENV_VARS`] naming it.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    sandbox::ReadOnlyBind,
    tls::{SandboxCa, SandboxTrust, TlsError},
};

const CERT_FILE: &str = "ca.pem";
const KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TrustError {
    let path = path.to_path_buf();
    move |source| TrustError::Io {
        action,
        path,
        source,
    }
}

/// What a sandbox's processes get so that they trust its CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSetup {
    /// Variables naming the bundle as the sandbox sees it.
    pub env: Vec<(String, String)>,
    /// The bundle mounted over the distro's default CA path, when the host has one.
    pub mount: Option<ReadOnlyBind>,
}

impl From<SandboxTrust> for TrustSetup {
    fn from(trust: SandboxTrust) -> Self {
        // Inside the sandbox the bundle is seen at the default path; the host path of the
        // bundle is below the gateway's private state and not reachable from there.
        let seen_at = trust
            .mount_target
            .clone()
            .unwrap_or_else(|| trust.bundle.clone());
        Self {
            env: trust
                .env
                .iter()
                .map(|(var, _)| ((*var).to_owned(), seen_at.display().to_string()))
                .collect(),
            mount: trust.mount_target.map(|target| ReadOnlyBind {
                source: trust.bundle,
                target,
            }),
        }
    }
}

/// The CAs of all sandboxes, one directory each.
#[derive(Debug, Clone)]
pub struct CaStore {
    dir: PathBuf,
}

impl CaStore {
    /// The store at `dir` (created `0700` when missing).
    pub fn open(dir: PathBuf) -> Result<Self, TrustError> {
        create_private_dir(&dir)?;
        Ok(Self { dir })
    }

    /// Sandbox `name`'s CA, made and saved on first use, and its freshly written trust bundle.
    pub fn ensure(&self, name: &str) -> Result<(Arc<SandboxCa>, TrustSetup), TrustError> {
        let dir = self.dir.join(name);
        create_private_dir(&dir)?;
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let ca = if key.exists() && cert.exists() {
            let cert_pem = fs::read_to_string(&cert).map_err(io_err("reading", &cert))?;
            let key_pem = fs::read_to_string(&key).map_err(io_err("reading", &key))?;
            SandboxCa::from_pem(name, &cert_pem, &key_pem)?
        } else {
            let ca = SandboxCa::generate(name)?;
            write_private(&key, ca.key_pem())?;
            write_private(&cert, ca.cert_pem())?;
            ca
        };
        let trust = crate::tls::write_trust_bundle(&ca, &dir)?;
        // Readable by the sandbox user through the bind mount (the directory stays 0700).
        fs::set_permissions(&trust.bundle, fs::Permissions::from_mode(0o644))
            .map_err(io_err("setting permissions of", &trust.bundle))?;
        Ok((Arc::new(ca), trust.into()))
    }

    /// Forgets sandbox `name`'s CA.
    pub fn remove(&self, name: &str) -> Result<(), TrustError> {
        let dir = self.dir.join(name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &dir)(e)),
        }
    }

    /// The sandbox names that have a CA.
    pub fn names(&self) -> Result<Vec<String>, TrustError> {
        let entries = fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))?;
        Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }
}

fn create_private_dir(dir: &Path) -> Result<(), TrustError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions of", dir))
}

/// Writes `text` to a new `0600` file (never widening permissions, not even briefly).
fn write_private(path: &Path, text: &str) -> Result<(), TrustError> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_ca_is_kept_private_and_survives_a_reload() {
        let root = tempfile::tempdir().unwrap();
        let store = CaStore::open(root.path().join("ca")).unwrap();
        let (ca, setup) = store.ensure("box").unwrap();
        let dir = root.path().join("ca/box");
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&root.path().join("ca")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join("ca-bundle.pem")), 0o644);
        let bundle = fs::read_to_string(dir.join("ca-bundle.pem")).unwrap();
        assert!(bundle.starts_with(ca.cert_pem()));
        assert!(!bundle.contains("PRIVATE KEY"));
        assert_eq!(setup.env.len(), crate::tls::TRUST_ENV_VARS.len());
        if let Some(mount) = &setup.mount {
            assert_eq!(mount.source, dir.join("ca-bundle.pem"));
            assert!(setup.env.iter().all(|(_, v)| Path::new(v) == mount.target));
        }
        let (again, _) = store.ensure("box").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(store.names().unwrap(), vec!["box".to_owned()]);
        store.remove("box").unwrap();
        assert!(!dir.exists());
        store.remove("box").unwrap();
    }
}
