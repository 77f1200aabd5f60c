//! `plugvisor new`: each language's skeleton, as generated, builds, passes
//! its own test and passes `plugvisor conformance`; bad names and occupied
//! directories are refused.

use plugvisor_integration_tests::{Sandbox, bin, skip};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the repository")
        .to_path_buf()
}

/// The workspace's target directory (`<target>/<profile>/plugvisor`).
fn target_dir() -> PathBuf {
    bin("plugvisor")
        .parent()
        .and_then(Path::parent)
        .expect("binaries sit in <target>/<profile>")
        .to_path_buf()
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed: {}", text(out));
}

/// `plugvisor new ARGS` in `cwd`.
fn new(cwd: &Path, args: &[&str]) -> Output {
    run(Command::new(bin("plugvisor"))
        .arg("new")
        .args(args)
        .current_dir(cwd))
}

/// `plugvisor conformance DIR` passes every rule, config delivery included.
/// `summary` is the report's closing count: the Rust SDK serves sessions,
/// the Python and Go skeletons do not (that optional rule is skipped).
fn assert_conforms(dir: &Path, name: &str, summary: &str) {
    let out = run(Command::new(bin("plugvisor")).arg("conformance").arg(dir));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "conformance: {}", text(&out));
    assert!(
        stdout.ends_with(&format!(
            "{summary}: {name} conforms to plugvisor protocol 1\n"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("its `config` method returned the token"),
        "{stdout}"
    );
}

#[test]
fn rust_skeleton_builds_passes_its_test_and_conforms() {
    let sandbox = Sandbox::new();
    let sdk = repo().join("plugin-sdk");
    let out = new(
        sandbox.dir.path(),
        &[
            "rs-skel",
            "--lang",
            "rust",
            "--sdk-path",
            sdk.to_str().expect("a UTF-8 path"),
        ],
    );
    assert_ok("plugvisor new --lang rust", &out);
    let dir = sandbox.dir.path().join("rs-skel");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!(
            "plugvisor-sdk = {{ path = \"{}\" }}",
            sdk.display()
        )),
        "{manifest}"
    );
    // Offline and quick: the workspace's locked versions (all in the local
    // registry cache), its target dir and its dev profile's debug setting,
    // so the dependencies the workspace built are reused where they match.
    std::fs::copy(repo().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let env = [
        ("CARGO_TARGET_DIR", target_dir().into_os_string()),
        ("CARGO_PROFILE_DEV_DEBUG", "line-tables-only".into()),
    ];
    let out = run(Command::new(&cargo)
        .args(["test", "--offline", "--quiet"])
        .envs(env.clone())
        .current_dir(&dir));
    assert_ok("the skeleton's `cargo test`", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test result: ok. 3 passed; 0 failed"),
        "{stdout}"
    );
    let out = run(Command::new(dir.join("build.sh"))
        .arg("--offline")
        .env("PROFILE", "dev")
        .envs(env)
        .current_dir(&dir));
    assert_ok("the skeleton's build.sh", &out);
    assert!(dir.join("bin/rs-skel").is_file());
    assert_conforms(&dir, "rs-skel", "12 passed, 0 failed, 0 skipped");
}

#[test]
fn python_skeleton_passes_its_test_and_conforms() {
    let python = repo().join(".venv/bin/python3");
    let helper = Command::new(&python)
        .args(["-c", "import plugvisor.v1"])
        .stdin(Stdio::null())
        .output();
    if !matches!(&helper, Ok(out) if out.status.success()) {
        return skip("the venv lacks the plugvisor helper package (run scripts/setup-python.sh)");
    }
    let sandbox = Sandbox::new();
    let out = new(
        sandbox.dir.path(),
        &[
            "py-skel",
            "--lang",
            "python",
            "--python",
            python.to_str().expect("a UTF-8 path"),
        ],
    );
    assert_ok("plugvisor new --lang python", &out);
    let dir = sandbox.dir.path().join("py-skel");
    let out = run(Command::new(&python)
        .arg("test_plugin.py")
        .current_dir(&dir));
    assert_ok("the skeleton's test_plugin.py", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.ends_with("3 passed, 0 failed\n"), "{stdout}");
    assert_conforms(&dir, "py-skel", "11 passed, 0 failed, 1 skipped");
}

#[test]
fn go_skeleton_passes_its_test_and_conforms() {
    if Command::new("go").arg("version").output().is_err() {
        return skip(
            "no `go` on PATH (apt-get install golang-go golang-google-grpc-dev golang-google-protobuf-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc; .ci/run does)",
        );
    }
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path().join("elsewhere");
    let out = new(
        sandbox.dir.path(),
        &["go-skel", "--lang", "go", "--dir", "elsewhere"],
    );
    assert_ok("plugvisor new --lang go", &out);
    // One compile cache for every run of this test: Debian's grpc-go is
    // compiled from source once, not per generated directory.
    let cache = target_dir().join("plugvisor-new-go-cache");
    let out = run(Command::new(dir.join("build.sh"))
        .arg("test")
        .env("GOCACHE", &cache)
        .current_dir(&dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        && (stderr.contains("not found") || stderr.contains("is not in /usr/share/gocode"))
    {
        // The script names the missing tool or package.
        return skip(stderr.trim());
    }
    assert_ok("the skeleton's `build.sh test`", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok "),
        "{}",
        text(&out)
    );
    let out = run(Command::new(dir.join("build.sh"))
        .env("GOCACHE", &cache)
        .current_dir(&dir));
    assert_ok("the skeleton's build.sh", &out);
    assert_conforms(&dir, "go-skel", "10 passed, 0 failed, 2 skipped");
}

#[test]
fn rust_skeleton_depends_on_the_sdk_by_path_inside_the_checkout_else_by_version() {
    // Inside the checkout: <repo>/target/... is in it.
    let inside = tempfile::Builder::new()
        .prefix("plugvisor-new-")
        .tempdir_in(target_dir())
        .unwrap();
    assert_ok(
        "plugvisor new inside the checkout",
        &new(inside.path(), &["inner", "--lang", "rust"]),
    );
    let manifest = std::fs::read_to_string(inside.path().join("inner/Cargo.toml")).unwrap();
    let sdk = manifest
        .lines()
        .find_map(|l| l.strip_prefix("plugvisor-sdk = { path = \""))
        .and_then(|rest| rest.strip_suffix("\" }"))
        .unwrap_or_else(|| panic!("no path dependency in:\n{manifest}"));
    assert!(sdk.starts_with("../"), "{sdk} is not relative");
    assert_eq!(
        inside
            .path()
            .join("inner")
            .join(sdk)
            .canonicalize()
            .unwrap(),
        repo().join("plugin-sdk").canonicalize().unwrap()
    );

    // Outside: by version.
    let outside = tempfile::tempdir().unwrap();
    assert_ok(
        "plugvisor new outside the checkout",
        &new(outside.path(), &["outer", "--lang", "rust"]),
    );
    let manifest = std::fs::read_to_string(outside.path().join("outer/Cargo.toml")).unwrap();
    let major_minor: Vec<&str> = env!("CARGO_PKG_VERSION").split('.').take(2).collect();
    assert!(
        manifest.contains(&format!("plugvisor-sdk = \"{}\"", major_minor.join("."))),
        "{manifest}"
    );
}

#[test]
fn refuses_a_name_a_manifest_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["Echo", "_echo", "ec ho", "../echo", &"x".repeat(64)] {
        let out = new(dir.path(), &[bad, "--lang", "go"]);
        assert_eq!(out.status.code(), Some(2), "`{bad}`: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("`{bad}` is not a valid plugin name"))
                && stderr.contains("a-z, 0-9, `_` or `-`"),
            "{stderr}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a refused name wrote something"
    );
}

#[test]
fn refuses_an_existing_directory_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("main.go"), "mine").unwrap();

    let out = new(dir.path(), &["taken", "--lang", "go"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("main.go")).unwrap(),
        "mine"
    );
    assert!(!target.join("plugin.yaml").exists());

    // An empty directory is fine; --force writes over a non-empty one.
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    assert_ok(
        "plugvisor new into an empty directory",
        &new(dir.path(), &["empty", "--lang", "python"]),
    );
    assert_ok(
        "plugvisor new --force",
        &new(dir.path(), &["taken", "--lang", "go", "--force"]),
    );
    assert_ne!(
        std::fs::read_to_string(target.join("main.go")).unwrap(),
        "mine"
    );
    assert!(target.join("plugin.yaml").is_file());
}
