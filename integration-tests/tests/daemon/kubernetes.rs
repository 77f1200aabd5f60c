//! deploy/kubernetes: every variant rendered (`kubectl kustomize`) and
//! validated against the Kubernetes API schemas (deploy/kubernetes/validate.py),
//! a broken manifest refused, the rendered config accepted by `plugvisor
//! check`, and the rendered probes sent to a real daemon as kubelet sends
//! them.

use crate::routing::{probe, wait_probe};
use plugvisor_integration_tests::{Daemon, Sandbox, bin, skip};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tonic_health::pb::health_check_response::ServingStatus;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs validate.py on `tree`, or says why it cannot run here.
fn validate(tree: &Path) -> Result<Output, String> {
    let python = repo().join(".venv-k8s/bin/python");
    if !python.exists() {
        return Err(format!(
            "{} is missing: run scripts/setup-k8s-tools.sh",
            python.display()
        ));
    }
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        return Err("kubectl is not installed (Debian: kubernetes-client)".into());
    }
    Ok(Command::new(python)
        .arg(repo().join("deploy/kubernetes/validate.py"))
        .arg("--json")
        .arg(tree)
        .output()
        .expect("validate.py runs"))
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn every_variant_renders_and_validates_and_a_broken_one_does_not() {
    let tree = repo().join("deploy/kubernetes");
    let out = match validate(&tree) {
        Ok(out) => out,
        Err(why) => return skip(&why),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the manifests are invalid:\n{stderr}");
    let variants: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = variants
        .iter()
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"DaemonSet") && names.contains(&"Deployment"),
        "{names:?}"
    );

    // Breakage no schema-less check would catch, each refused.
    let breakages: [(&str, &str, &str, &str); 4] = [
        (
            "overlays/daemonset/daemonset.yaml",
            "containerPort: 8081",
            "containerPort: \"8081\"",
            "containerPort",
        ),
        (
            "overlays/deployment/deployment.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: true\n            readOnlyRootFilesytem: true",
            "readOnlyRootFilesytem",
        ),
        (
            "overlays/daemonset/daemonset.yaml",
            "service: plugvisor.readiness",
            "service: readiness",
            "does not serve",
        ),
        (
            "base/servicemonitor.yaml",
            "interval: 30s",
            "interval: thirty",
            "interval",
        ),
    ];
    for (file, from, to, says) in breakages {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&tree, dir.path());
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no `{from}`");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let out = validate(dir.path()).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "`{to}` in {file} passed validation");
        assert!(stderr.contains(says), "`{to}` in {file}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_config_loads_and_the_rendered_probes_pass_on_a_real_daemon() {
    let out = match validate(&repo().join("deploy/kubernetes")) {
        Ok(out) => out,
        Err(why) => return skip(&why),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let variants: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    for variant in &variants {
        // The daemon accepts the config the pod gets (unknown keys would be
        // refused).
        let config = sandbox
            .dir
            .path()
            .join(format!("{}.yaml", variant["variant"].as_str().unwrap()));
        std::fs::write(&config, variant["config"].as_str().unwrap()).unwrap();
        let check = Command::new(bin("plugvisor"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .arg("--plugins-dir")
            .arg(sandbox.plugins_dir())
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}: {}",
            variant["variant"],
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // The probes each variant declares, against a real daemon serving
    // health where the config says (here on a free port of 127.0.0.1).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(&sandbox, &["--health-address", &address]);
    for variant in &variants {
        for (kind, probe_spec) in variant["probes"].as_object().unwrap() {
            let service = probe_spec["service"].as_str().unwrap();
            wait_probe(&address, service, ServingStatus::Serving).await;
            println!("{} {kind}: `{service}` SERVING", variant["variant"]);
        }
    }
    // Readiness follows the plugins; liveness does not.
    tokio::task::block_in_place(|| daemon.cli_ok(&["stop", "echo"]));
    assert_eq!(
        probe(&address, "plugvisor.readiness").await.unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        probe(&address, "plugvisor.liveness").await.unwrap(),
        ServingStatus::Serving
    );
}
