//! The Python helper package (`<repo>/python`, installed into `.venv` by
//! scripts/setup-python.sh): a plugin of a few lines on it passes `plugvisor
//! conformance`, including its stream rule.

use plugvisor_integration_tests::{Sandbox, bin, skip};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

const PLUGIN: &str = r#"import json
import plugvisor

class Echo(plugvisor.Plugin):
    methods = ["echo", "config"]
    stream_methods = ["echo"]

    def initialize(self, config, restored, restored_version):
        self.config = config

    def handle(self, call):
        return json.dumps(self.config) if call.method == "config" else call.payload

    def handle_stream(self, call, chunks):
        yield call.payload
        yield from chunks

plugvisor.serve(Echo())
"#;

#[test]
fn a_ten_line_python_plugin_conforms() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = repo.join(".venv/bin/python3");
    let helper = Command::new(&python)
        .args(["-c", "import plugvisor.v1"])
        .stdin(Stdio::null())
        .output();
    if !matches!(&helper, Ok(out) if out.status.success()) {
        return skip("the venv lacks the plugvisor helper package (run scripts/setup-python.sh)");
    }
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path().join("py");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plugin.py"), PLUGIN).unwrap();
    // The launcher must exec: the listener has to be the spawned process.
    let launcher = dir.join("run");
    std::fs::write(
        &launcher,
        format!(
            "#!/bin/sh\nexec {} \"$(dirname \"$0\")/plugin.py\"\n",
            python.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    let manifest = sandbox.plugin("py", &launcher, "timeouts: {start: 20s}");
    let out = Command::new(bin("plugvisor"))
        .arg("conformance")
        .arg(&manifest)
        .stdin(Stdio::null())
        .output()
        .expect("plugvisor runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("11 passed, 0 failed, 1 skipped"),
        "{stdout}"
    );
    assert!(
        stdout.contains("its `config` method returned the token"),
        "{stdout}"
    );
}
