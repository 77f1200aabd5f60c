//! Config validation before a runtime config change: every ready replica is
//! asked `ValidateConfig` with the complete config it would run with, and a
//! change any of them refuses is not rolled out.
//!
//! The RPC is optional: a plugin that answers UNIMPLEMENTED has nothing to
//! say and accepts. A replica that is not ready (starting, backing off) is
//! not asked; the rollout's own Initialize is its check.

use crate::error::Error;
use crate::replica::Common;
use plugvisor_proto::ValidateConfigRequest;
use std::time::Duration;

/// Asks every ready replica of `plugin` whether it accepts `config`.
/// `Err` names the first one that refused (or could not answer) and why.
pub(crate) async fn ask_replicas(
    plugin: &Common,
    replicas: usize,
    config: &serde_json::Map<String, serde_json::Value>,
    timeout: Duration,
) -> Result<(), Error> {
    let config_json = serde_json::Value::Object(config.clone()).to_string();
    for index in 0..replicas {
        let Some(ready) = plugin.routes.ready(index) else {
            continue;
        };
        let mut client = ready.client.clone();
        let mut request = tonic::Request::new(ValidateConfigRequest {
            config_json: config_json.clone(),
        });
        request.set_timeout(timeout);
        let refused = |why: String| {
            Error::Invalid(format!(
                "`{}` refused the new config (replica {index}, instance {}): {why}; nothing was changed",
                plugin.name, ready.id
            ))
        };
        match tokio::time::timeout(timeout, client.validate_config(request)).await {
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                if !answer.accepted {
                    let reason = if answer.reason.is_empty() {
                        "the plugin gave no reason".to_string()
                    } else {
                        answer.reason
                    };
                    return Err(refused(reason));
                }
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {}
            Ok(Err(status)) => {
                return Err(refused(format!(
                    "ValidateConfig failed: {:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Err(_) => {
                return Err(refused(format!(
                    "ValidateConfig did not answer within {}ms",
                    timeout.as_millis()
                )));
            }
        }
    }
    Ok(())
}
