//! What a replica runs: a manifest with its config and environment merged.

use crate::config::{PluginOverride, merge_json};
use crate::manifest::Manifest;
use std::sync::Arc;

/// What a replica starts: a manifest with its config and environment
/// already merged (manifest defaults < supervisor config overrides <
/// runtime overrides). Immutable; the coordinator makes a new one for each
/// change and hands it to every replica at once.
#[derive(Debug)]
pub(crate) struct Spec {
    pub manifest: Arc<Manifest>,
    /// Sent in Initialize.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Added to the child's clean environment.
    pub env: Vec<(String, String)>,
}

impl Spec {
    pub fn new(
        manifest: Arc<Manifest>,
        overrides: &PluginOverride,
        runtime: &serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let mut config = manifest.config.clone();
        merge_json(&mut config, &overrides.config);
        merge_json(&mut config, runtime);
        let mut env = manifest.env.clone();
        env.extend(overrides.env.clone());
        Spec {
            config,
            env: env.into_iter().collect(),
            manifest,
        }
    }
}
