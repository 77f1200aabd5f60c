//! `plugvisor tenant list | add | remove | enable | disable`: the client side
//! of the control API's `Tenant` RPC. A tenant runs as the entry
//! `PLUGIN@TENANT`, the name every other verb takes (`call kv@acme get`).

use crate::control;
use clap::Subcommand;
use pb::tenant_request::Action;
use plugvisor_proto as pb;
use std::path::Path;

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// List the tenants (of every plugin, or of --plugin).
    List {
        #[arg(long)]
        plugin: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start a new tenant of a plugin, with its own config, environment and
    /// limits. It is kept (across reloads and restarts) until removed.
    Add {
        /// TENANT (with --plugin) or PLUGIN@TENANT.
        name: String,
        #[arg(long)]
        plugin: Option<String>,
        /// A config key for this tenant: KEY=VALUE (VALUE parsed as JSON
        /// when it is JSON, else a string). Repeatable.
        #[arg(long, value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// An environment variable for this tenant. Repeatable.
        #[arg(long, value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// A limit replacing the manifest's, as under `limits:`
        /// (memory=64MiB, cpu=0.5, pids=32). Repeatable.
        #[arg(long, value_name = "NAME=VALUE")]
        limit: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a tenant added with `tenant add` and forget it (its state
    /// snapshots stay on disk).
    Remove {
        name: String,
        #[arg(long)]
        plugin: Option<String>,
    },
    /// Start a disabled tenant again.
    Enable {
        name: String,
        #[arg(long)]
        plugin: Option<String>,
    },
    /// Stop only this tenant's instance; other tenants and the plugin run on.
    Disable {
        name: String,
        #[arg(long)]
        plugin: Option<String>,
    },
}

/// `(plugin, tenant)` from `TENANT --plugin P` or `P@TENANT`.
fn target(name: &str, plugin: &Option<String>) -> anyhow::Result<(String, String)> {
    match (name.split_once('@'), plugin) {
        (Some((p, t)), None) => Ok((p.to_string(), t.to_string())),
        (None, Some(p)) => Ok((p.clone(), name.to_string())),
        (Some((p, t)), Some(given)) if p == given => Ok((p.to_string(), t.to_string())),
        (Some(_), Some(given)) => {
            anyhow::bail!("`{name}` names another plugin than --plugin {given}")
        }
        (None, None) => anyhow::bail!("say which plugin: `{name}` --plugin P, or P@{name}"),
    }
}

/// KEY=VALUE pairs as a JSON object; values are JSON when they parse.
fn pairs(
    flag: &str,
    items: &[String],
    json_values: bool,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut map = serde_json::Map::new();
    for pair in items {
        let Some((key, value)) = pair.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            anyhow::bail!("--{flag}: `{pair}` is not KEY=VALUE");
        };
        let value = if json_values {
            serde_json::from_str(value)
                .unwrap_or_else(|_| serde_json::Value::String(value.to_string()))
        } else {
            serde_json::Value::String(value.to_string())
        };
        map.insert(key.to_string(), value);
    }
    Ok(map)
}

/// Runs a `tenant` verb against the daemon at `control_path`.
pub async fn run(command: &TenantCommand, control_path: &Path) -> anyhow::Result<i32> {
    let (action, plugin, tenant, spec, json) = match command {
        TenantCommand::List { plugin, json } => (
            Action::List,
            plugin.clone().unwrap_or_default(),
            String::new(),
            String::new(),
            *json,
        ),
        TenantCommand::Add {
            name,
            plugin,
            config,
            env,
            limit,
            json,
        } => {
            let (p, t) = target(name, plugin)?;
            let mut spec = serde_json::Map::new();
            spec.insert("config".into(), pairs("config", config, true)?.into());
            spec.insert("env".into(), pairs("env", env, false)?.into());
            // Numbers stay numbers (cpu=0.5, pids=32); sizes and durations
            // are strings, as in a manifest.
            spec.insert("limits".into(), pairs("limit", limit, true)?.into());
            (
                Action::Add,
                p,
                t,
                serde_json::Value::Object(spec).to_string(),
                *json,
            )
        }
        TenantCommand::Remove { name, plugin } => {
            let (p, t) = target(name, plugin)?;
            (Action::Remove, p, t, String::new(), false)
        }
        TenantCommand::Enable { name, plugin } => {
            let (p, t) = target(name, plugin)?;
            (Action::Enable, p, t, String::new(), false)
        }
        TenantCommand::Disable { name, plugin } => {
            let (p, t) = target(name, plugin)?;
            (Action::Disable, p, t, String::new(), false)
        }
    };
    let mut client = control::connect(control_path).await?;
    let response = client
        .tenant(pb::TenantRequest {
            action: action as i32,
            plugin,
            tenant,
            spec_json: spec,
        })
        .await?
        .into_inner();
    if json {
        let rows: Vec<serde_json::Value> = response.tenants.iter().map(row_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_rows(&response.tenants);
    }
    Ok(0)
}

fn row_json(t: &pb::TenantStatus) -> serde_json::Value {
    let status = t.status.as_ref();
    serde_json::json!({
        "name": t.name,
        "plugin": t.plugin,
        "tenant": t.tenant,
        "source": t.source,
        "enabled": t.enabled,
        "state": status.map(|s| s.state.clone()),
        "pid": status.and_then(|s| (s.pid != 0).then_some(s.pid)),
        "restarts": status.map(|s| s.restarts),
        "version": status.map(|s| s.version.clone()),
        "methods": status.map(|s| s.methods.clone()),
    })
}

fn print_rows(tenants: &[pb::TenantStatus]) {
    let header = ["NAME", "SOURCE", "STATE", "PID", "RESTARTS"];
    let rows: Vec<[String; 5]> = tenants
        .iter()
        .map(|t| {
            let s = t.status.as_ref();
            [
                t.name.clone(),
                t.source.clone(),
                match s {
                    _ if !t.enabled => "disabled".to_string(),
                    Some(s) => s.state.clone(),
                    None => "not running".to_string(),
                },
                s.filter(|s| s.pid != 0)
                    .map_or("-".to_string(), |s| s.pid.to_string()),
                s.map_or("-".to_string(), |s| s.restarts.to_string()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
