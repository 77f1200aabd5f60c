//! `container:` — a plugin that runs as an OCI container instead of an
//! executable (see [`crate::container`] for how it runs).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The container runtime that runs the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    /// `podman run` of a local image.
    #[default]
    Podman,
    /// `runc run` of an OCI bundle (a `config.json` and its root
    /// filesystem).
    Runc,
}

impl ContainerRuntime {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerRuntime::Podman => "podman",
            ContainerRuntime::Runc => "runc",
        }
    }
}

/// `container:` as written in the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    #[serde(default)]
    pub runtime: ContainerRuntime,
    /// podman: the image to run, by name or `name@sha256:...`. Never pulled:
    /// it must be in the local image store.
    #[serde(default)]
    pub image: Option<String>,
    /// runc: the OCI bundle directory, relative to the manifest's
    /// directory.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// podman: the OCI runtime podman uses (`--runtime`, e.g. `runc`);
    /// podman's default when absent.
    #[serde(default)]
    pub oci_runtime: Option<String>,
}

impl ContainerSpec {
    /// Checks the spec and resolves `bundle` against `dir`. `Err((field,
    /// message))` names the field below `container.`.
    pub fn validate(mut self, dir: &Path) -> Result<ContainerSpec, (String, String)> {
        let field = |f: &str, m: String| Err((f.to_string(), m));
        match self.runtime {
            ContainerRuntime::Podman => {
                if self.bundle.is_some() {
                    return field(
                        "bundle",
                        "runtime podman runs an image; use `image:` (or `runtime: runc` for a bundle)"
                            .into(),
                    );
                }
                match &self.image {
                    None => return field("image", "runtime podman needs an image to run".into()),
                    Some(image) => {
                        if image.is_empty()
                            || image.starts_with('-')
                            || image.chars().any(|c| c.is_whitespace() || c.is_control())
                        {
                            return field("image", format!("`{image}` is not an image reference"));
                        }
                    }
                }
                if let Some(rt) = &self.oci_runtime
                    && (rt.is_empty()
                        || rt.starts_with('-')
                        || rt.chars().any(|c| c.is_whitespace() || c.is_control()))
                {
                    return field("oci_runtime", format!("`{rt}` is not a runtime name"));
                }
            }
            ContainerRuntime::Runc => {
                if self.image.is_some() {
                    return field(
                        "image",
                        "runtime runc runs a bundle; use `bundle:` (or `runtime: podman` for an image)"
                            .into(),
                    );
                }
                if self.oci_runtime.is_some() {
                    return field(
                        "oci_runtime",
                        "only podman takes an OCI runtime; runtime runc is one".into(),
                    );
                }
                match &self.bundle {
                    None => {
                        return field(
                            "bundle",
                            "runtime runc needs an OCI bundle directory (holding config.json)"
                                .into(),
                        );
                    }
                    Some(b) => self.bundle = Some(dir.join(b)),
                }
            }
        }
        Ok(self)
    }

    /// The program the supervisor starts: the runtime, found in the
    /// plugins' `PATH` (its bare name when it is not there; the start then
    /// fails saying so).
    pub fn runtime_program(&self) -> PathBuf {
        let name = self.runtime.as_str();
        crate::instance::DEFAULT_PATH
            .split(':')
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    }
}
