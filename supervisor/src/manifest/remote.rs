//! `remote:` — a plugin that runs on another host and is reached over TCP
//! with mutual TLS instead of being spawned. See [`crate::remote`].

use crate::tls::TlsFiles;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Top-level manifest fields that only make sense for a child the
/// supervisor spawns; a remote manifest that sets one is refused.
pub(super) const LOCAL_ONLY: &[(&str, &str)] = &[
    (
        "container",
        "a remote plugin is not run here: there is no image to run",
    ),
    (
        "hooks",
        "a remote plugin is not run here: hooks run beside a local child",
    ),
    (
        "exec",
        "a remote plugin is not spawned: there is no executable",
    ),
    (
        "args",
        "a remote plugin is not spawned: there are no arguments",
    ),
    (
        "env",
        "a remote plugin is not spawned: there is no environment to set",
    ),
    (
        "sha256",
        "a remote plugin's executable is not on this host to pin",
    ),
    (
        "limits",
        "cgroup and rlimit limits cannot be applied to a process on another host",
    ),
    (
        "isolation",
        "uid, capabilities, seccomp, namespaces and the filesystem view cannot be applied to a process on another host",
    ),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
    address: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    identity: String,
}

/// Where a remote plugin runs and how the supervisor proves who each side is.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// `host:port` the plugin serves `plugvisor.v1.Plugin` on, over TLS.
    pub address: String,
    /// The CA the plugin's certificate must chain to, and the client
    /// certificate and key the supervisor presents.
    pub tls: TlsFiles,
    /// The SAN (DNS name or IP) the plugin's certificate must carry.
    pub identity: String,
    /// Set when the plugin announced itself to the registry.
    pub registration: Option<crate::registry::Registration>,
}

impl RawRemote {
    /// Validates the fields; relative file paths are taken from `dir`.
    pub(super) fn resolve(self, dir: &Path) -> Result<RemoteSpec, (&'static str, String)> {
        validate_address(&self.address).map_err(|m| ("address", m))?;
        crate::tls::server_name(&self.identity).map_err(|m| ("identity", m))?;
        for (field, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if path.as_os_str().is_empty() {
                return Err((field, "must name a PEM file".into()));
            }
        }
        Ok(RemoteSpec {
            address: self.address,
            tls: TlsFiles {
                ca: dir.join(self.ca),
                cert: dir.join(self.cert),
                key: dir.join(self.key),
            },
            identity: self.identity,
            registration: None,
        })
    }
}

/// `host:port`, with a port that is a number from 1 to 65535.
pub fn validate_address(address: &str) -> Result<(), String> {
    let expected = "expected host:port, such as `10.0.0.5:7443` or `plugins.example:7443`";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("`{address}` has no port; {expected}"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("`{address}` has no host; {expected}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a port (1-65535); {expected}")),
    }
}
