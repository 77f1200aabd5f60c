//! `plugvisor new NAME --lang rust|python|go`: writes a plugin skeleton that
//! passes `plugvisor conformance` as generated: the plugin's source, its
//! `plugin.yaml`, a build script or launcher where the language needs one,
//! and a test of its own.
//!
//! The templates live in `supervisor/cli/templates/<lang>/` and are compiled
//! into the binary; `{{name}}`-style placeholders are filled in here. The Go
//! skeleton also gets a copy of `plugin.proto` (its stubs are generated at
//! build time) and the grpc-go codec of `examples/go-echo`.

use anyhow::{Context, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The languages `plugvisor new` writes skeletons for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// On the `plugvisor-sdk` crate; its test uses `testing::Harness`.
    Rust,
    /// On the plugvisor helper package (`pip install <repo>/python`).
    Python,
    /// On grpc-go, built in GOPATH mode with Debian's Go packages.
    Go,
}

/// What `plugvisor new` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub lang: Lang,
    /// Where to write the skeleton (default: `./NAME`).
    pub dir: Option<PathBuf>,
    /// Write into an existing, non-empty directory, replacing the skeleton's
    /// files there.
    pub force: bool,
    /// Rust: depend on the SDK at this path instead of finding it.
    pub sdk_path: Option<PathBuf>,
    /// Python: the interpreter the launcher runs (PYTHON).
    pub python: Option<PathBuf>,
}

/// One file of a skeleton: its path inside the plugin directory, its text,
/// and whether it is a script to make executable.
struct File {
    path: &'static str,
    text: String,
    executable: bool,
}

/// `plugvisor new`: writes the skeleton and prints what to do next. Returns
/// the exit code: 0 written, 2 a usage error (a bad name); other failures
/// are errors (exit 1).
pub fn command(options: &Options) -> anyhow::Result<i32> {
    if let Err(why) = plugvisor::manifest::validate_name(&options.name) {
        eprintln!("plugvisor new: {why}");
        return Ok(2);
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let dir = cwd.join(
        options
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(&options.name)),
    );
    check_target(&dir, options.force)?;
    let files = match options.lang {
        Lang::Rust => rust(options, &dir, &cwd)?,
        Lang::Python => python(options, &dir, &cwd)?,
        Lang::Go => go(&options.name),
    };
    for file in &files {
        write(&dir, file)?;
    }
    let shown = dir.strip_prefix(&cwd).unwrap_or(&dir).display().to_string();
    let shown = if shown.is_empty() { ".".into() } else { shown };
    println!(
        "created the {} plugin `{}` in {shown}",
        lang_name(options.lang),
        options.name
    );
    println!("next:\n  cd {shown}");
    match options.lang {
        Lang::Rust => println!("  cargo test\n  ./build.sh"),
        Lang::Python => {
            println!("  python3 test_plugin.py   # a python3 with the plugvisor helper package")
        }
        Lang::Go => println!("  ./build.sh test\n  ./build.sh"),
    }
    println!("  plugvisor conformance .");
    Ok(0)
}

fn lang_name(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
        Lang::Go => "Go",
    }
}

/// Refuses to write into anything but a missing or empty directory, unless
/// `force`.
fn check_target(dir: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
        Ok(meta) if !meta.is_dir() => bail!(
            "{} exists and is not a directory; choose another --dir",
            dir.display()
        ),
        Ok(_) if force => Ok(()),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            if entries.next().is_some() {
                bail!(
                    "{} already exists and is not empty; choose another --dir, or pass --force to write the skeleton's files over what is there",
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

fn write(dir: &Path, file: &File) -> anyhow::Result<()> {
    let path = dir.join(file.path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&path, &file.text)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mode = if file.executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Fills `{{key}}` placeholders.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
}

/// The plugin's type name in Rust and Python: `echo` -> `EchoPlugin`,
/// `my-plugin` -> `MyPlugin` (never plain `Plugin`, the SDK's trait).
fn type_name(name: &str) -> String {
    let mut camel: String = name
        .split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    if !camel.ends_with("Plugin") || camel == "Plugin" {
        camel.push_str("Plugin");
    }
    if camel.starts_with(|c: char| c.is_ascii_digit()) {
        camel.insert(0, 'P');
    }
    camel
}

/// The Cargo package and binary name: the plugin's name, unless Cargo would
/// refuse it (a leading digit) or it names one of Cargo's own directories.
fn crate_name(name: &str) -> String {
    const RESERVED: [&str; 6] = ["build", "deps", "examples", "incremental", "test", "self"];
    if name.starts_with(|c: char| c.is_ascii_digit()) || RESERVED.contains(&name) {
        format!("plugin-{name}")
    } else {
        name.to_string()
    }
}

/// The plugvisor checkout `dir` is inside, if any: the nearest ancestor
/// holding `plugin-sdk/` with the SDK's Cargo.toml.
fn enclosing_repo(dir: &Path) -> Option<PathBuf> {
    let dir = resolve(dir);
    dir.ancestors()
        .find(|a| {
            std::fs::read_to_string(a.join("plugin-sdk/Cargo.toml"))
                .is_ok_and(|text| text.contains("name = \"plugvisor-sdk\""))
        })
        .map(Path::to_path_buf)
}

/// `path` with its longest existing prefix canonicalized (the rest may not
/// exist yet) and `.`/`..` resolved.
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.iter().rev() {
        match Path::new(name).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::CurDir) => {}
            _ => out.push(name),
        }
    }
    out
}

/// `to` relative to `from` (both absolute and resolved).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to[common..] {
        out.push(part);
    }
    out
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

fn rust(options: &Options, dir: &Path, cwd: &Path) -> anyhow::Result<Vec<File>> {
    let sdk = match &options.sdk_path {
        Some(path) => {
            let path = resolve(&cwd.join(path));
            if !path.join("Cargo.toml").is_file() {
                bail!(
                    "--sdk-path {}: no Cargo.toml there; point it at the plugin-sdk directory of a plugvisor checkout",
                    path.display()
                );
            }
            Some(path)
        }
        None => enclosing_repo(dir).map(|repo| relative(&resolve(dir), &repo.join("plugin-sdk"))),
    };
    let sdk_dependency = match sdk {
        Some(path) => format!("{{ path = {} }}", toml_string(&path.display().to_string())),
        None => {
            let version = semver_req(env!("CARGO_PKG_VERSION"));
            toml_string(&version)
        }
    };
    let name = options.name.as_str();
    let (krate, ty) = (crate_name(name), type_name(name));
    let values = [
        ("name", name),
        ("crate", krate.as_str()),
        ("type", ty.as_str()),
        ("sdk_dependency", sdk_dependency.as_str()),
    ];
    let file = |path, template: &str, executable| File {
        path,
        text: fill(template, &values),
        executable,
    };
    Ok(vec![
        file(
            "Cargo.toml",
            include_str!("../templates/rust/Cargo.toml"),
            false,
        ),
        file(
            "src/main.rs",
            include_str!("../templates/rust/main.rs"),
            false,
        ),
        file("build.sh", include_str!("../templates/rust/build.sh"), true),
        file(
            "plugin.yaml",
            include_str!("../templates/rust/plugin.yaml"),
            false,
        ),
        file(
            "README.md",
            include_str!("../templates/rust/README.md"),
            false,
        ),
        file(
            ".gitignore",
            include_str!("../templates/rust/gitignore"),
            false,
        ),
    ])
}

/// The dependency requirement matching this plugvisor: `0.1` for 0.1.x,
/// `1` for 1.x.
fn semver_req(version: &str) -> String {
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}"),
        (Some(major), _) => major.to_string(),
        _ => version.to_string(),
    }
}

/// The Python the launcher should run: `--python`, else the active
/// virtualenv's, else the `.venv` of the plugvisor checkout the skeleton is
/// in; `None` leaves it to `python3` on the supervisor's PATH.
fn python_interpreter(options: &Options, dir: &Path, cwd: &Path) -> Option<PathBuf> {
    if let Some(python) = &options.python {
        return Some(cwd.join(python));
    }
    let venv_python = |venv: &Path| {
        let python = venv.join("bin/python3");
        python.is_file().then_some(python)
    };
    std::env::var_os("VIRTUAL_ENV")
        .and_then(|venv| venv_python(Path::new(&venv)))
        .or_else(|| enclosing_repo(dir).and_then(|repo| venv_python(&repo.join(".venv"))))
}

fn python(options: &Options, dir: &Path, cwd: &Path) -> anyhow::Result<Vec<File>> {
    let env = match python_interpreter(options, dir, cwd) {
        Some(python) => {
            let python = python.display().to_string();
            // A JSON string is a YAML double-quoted scalar.
            let quoted = serde_json::to_string(&python)?;
            format!(
                "# The interpreter `run` execs; it needs the plugvisor helper package.\nenv: {{PYTHON: {quoted}}}\n"
            )
        }
        None => "# `run` execs python3 from the supervisor's PATH; to use another\n# interpreter (a virtualenv's), set it here:\n# env: {PYTHON: /path/to/venv/bin/python3}\n".to_string(),
    };
    let name = options.name.as_str();
    let ty = type_name(name);
    let values = [("name", name), ("type", ty.as_str()), ("env", env.as_str())];
    let file = |path, template: &str, executable| File {
        path,
        text: fill(template, &values),
        executable,
    };
    Ok(vec![
        file(
            "plugin.py",
            include_str!("../templates/python/plugin.py"),
            false,
        ),
        file("run", include_str!("../templates/python/run"), true),
        file(
            "test_plugin.py",
            include_str!("../templates/python/test_plugin.py"),
            true,
        ),
        file(
            "plugin.yaml",
            include_str!("../templates/python/plugin.yaml"),
            false,
        ),
        file(
            "README.md",
            include_str!("../templates/python/README.md"),
            false,
        ),
        file(
            ".gitignore",
            include_str!("../templates/python/gitignore"),
            false,
        ),
    ])
}

fn go(name: &str) -> Vec<File> {
    let values = [("name", name)];
    let file = |path, template: &str, executable| File {
        path,
        text: fill(template, &values),
        executable,
    };
    vec![
        file("main.go", include_str!("../templates/go/main.go"), false),
        file(
            "main_test.go",
            include_str!("../templates/go/main_test.go"),
            false,
        ),
        // Copied as they are: no placeholders.
        File {
            path: "codec.go",
            text: include_str!("../../../examples/go-echo/codec.go").to_string(),
            executable: false,
        },
        File {
            path: "proto/plugvisor/v1/plugin.proto",
            text: include_str!("../../../proto/plugvisor/v1/plugin.proto").to_string(),
            executable: false,
        },
        file("build.sh", include_str!("../templates/go/build.sh"), true),
        file(
            "plugin.yaml",
            include_str!("../templates/go/plugin.yaml"),
            false,
        ),
        file(
            "README.md",
            include_str!("../templates/go/README.md"),
            false,
        ),
        file(
            ".gitignore",
            include_str!("../templates/go/gitignore"),
            false,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_camel_case_rust_and_python_identifiers() {
        assert_eq!(type_name("echo"), "EchoPlugin");
        assert_eq!(type_name("my-plugin"), "MyPlugin");
        assert_eq!(type_name("a_b-c"), "ABCPlugin");
        assert_eq!(type_name("9lives"), "P9livesPlugin");
        assert_eq!(type_name("x--y"), "XYPlugin");
        assert_eq!(type_name("plugin"), "PluginPlugin");
    }

    #[test]
    fn crate_names_avoid_what_cargo_refuses() {
        assert_eq!(crate_name("echo"), "echo");
        assert_eq!(crate_name("9lives"), "plugin-9lives");
        assert_eq!(crate_name("deps"), "plugin-deps");
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        assert_eq!(
            relative(Path::new("/r/examples/foo"), Path::new("/r/plugin-sdk")),
            Path::new("../../plugin-sdk")
        );
        assert_eq!(
            relative(Path::new("/r/foo"), Path::new("/r/foo/x")),
            Path::new("x")
        );
    }

    #[test]
    fn placeholders_are_filled_everywhere() {
        assert_eq!(
            fill("{{a}}-{{b}}-{{a}}", &[("a", "1"), ("b", "2")]),
            "1-2-1"
        );
    }

    #[test]
    fn the_sdk_version_requirement_follows_semver_compatibility() {
        assert_eq!(semver_req("0.1.0"), "0.1");
        assert_eq!(semver_req("1.4.2"), "1");
    }

    #[test]
    fn refuses_a_non_empty_directory_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        check_target(&dir.path().join("missing"), false).unwrap();
        check_target(dir.path(), false).unwrap();
        std::fs::write(dir.path().join("x"), "").unwrap();
        let err = check_target(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        check_target(dir.path(), true).unwrap();
        let err = check_target(&dir.path().join("x"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
