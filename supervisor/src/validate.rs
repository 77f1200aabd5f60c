//! Config validation before a config change is rolled out: every ready
//! replica is asked `ValidateConfig` with the complete config it would run
//! with, and a change any of them refuses is not rolled out.
//!
//! The RPC is optional: a plugin that answers UNIMPLEMENTED has nothing to
//! say and accepts. A replica that is not ready (starting, backing off) is
//! not asked; the rollout's own Initialize is its check.
//!
//! Which plugin is asked depends on where the change comes from:
//!
//! - `plugvisor config` (runtime config), and an upgrade or reload that
//!   changes the config but keeps the plugin's version: the running
//!   instances, before anything changes ([`ask_replicas`], from
//!   [`changed_config`]).
//! - An upgrade to another version with a changed config: the running
//!   version cannot speak for the new one, so each new instance is asked
//!   ([`ask`]) after its Initialize and before it takes calls; a refusal
//!   fails that replica's switch and rolls the whole upgrade back.

use crate::error::Error;
use crate::instance::Client;
use crate::replica::{Common, Spec};
use plugvisor_proto::ValidateConfigRequest;
use std::time::Duration;

/// Asks one instance whether it accepts `config`. `Ok` when it accepts or
/// does not implement the RPC; `Err(why)` when it refuses, fails or does
/// not answer within `timeout`.
pub(crate) async fn ask(
    client: &Client,
    config: &serde_json::Map<String, serde_json::Value>,
    timeout: Duration,
) -> Result<(), String> {
    let mut client = client.clone();
    let mut request = tonic::Request::new(ValidateConfigRequest {
        config_json: serde_json::Value::Object(config.clone()).to_string(),
    });
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.validate_config(request)).await {
        Ok(Ok(answer)) => {
            let answer = answer.into_inner();
            if answer.accepted {
                Ok(())
            } else if answer.reason.is_empty() {
                Err("the plugin gave no reason".to_string())
            } else {
                Err(answer.reason)
            }
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Ok(()),
        Ok(Err(status)) => Err(format!(
            "ValidateConfig failed: {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(_) => Err(format!(
            "ValidateConfig did not answer within {}ms",
            timeout.as_millis()
        )),
    }
}

/// Asks every ready replica of `plugin` whether it accepts `config`.
/// `Err` names the first one that refused (or could not answer) and why.
pub(crate) async fn ask_replicas(
    plugin: &Common,
    replicas: usize,
    config: &serde_json::Map<String, serde_json::Value>,
    timeout: Duration,
) -> Result<(), Error> {
    for index in 0..replicas {
        let Some(ready) = plugin.routes.ready(index) else {
            continue;
        };
        if let Err(why) = ask(&ready.client, config, timeout).await {
            return Err(Error::Invalid(format!(
                "`{}` refused the new config (replica {index}, instance {}): {why}; nothing was changed",
                plugin.name, ready.id
            )));
        }
    }
    Ok(())
}

/// Whether a rollout from `current` to `new` must first be validated by the
/// running replicas: its config changed and its version did not.
pub(crate) fn changed_config(current: &Spec, new: &Spec) -> bool {
    current.config != new.config && current.manifest.version == new.manifest.version
}

/// Whether a new instance of `new` must validate its config before it takes
/// calls: the upgrade changes the version and the config.
pub(crate) fn changed_config_and_version(current: &Spec, new: &Spec) -> bool {
    current.config != new.config && current.manifest.version != new.manifest.version
}
