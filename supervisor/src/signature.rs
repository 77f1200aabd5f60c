//! Signed plugins: a plugin directory may carry `plugin.sums`, a
//! `sha256sum`-style list of its files (the manifest and the executable at
//! least), and `plugin.sums.minisig`, a minisign signature over that list.
//! The supervisor config lists the public keys it trusts (`trusted_keys`),
//! each under a name; `require_signatures: true` refuses unsigned plugins.
//!
//! What is compared is what runs: the manifest's digest is taken from the
//! very text that was parsed, and the executable's from the sealed copy the
//! child executes (see [`crate::isolation::pin`]), so no file can be changed
//! between the check and its use. Other files the list names (a script's
//! modules, data) are read and compared at each start.
//!
//! The format is the one stock tools make: `sha256sum plugin.yaml exe >
//! plugin.sums && minisign -Sm plugin.sums` signs a plugin as `plugvisor
//! sign` does.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The list of signed files, in a plugin's directory.
pub const SUMS_FILE: &str = "plugin.sums";
/// The minisign signature over [`SUMS_FILE`].
pub const SIGNATURE_FILE: &str = "plugin.sums.minisig";
/// Larger lists are refused unread.
const MAX_SUMS_BYTES: u64 = 64 * 1024;
/// A minisign signature is about 300 bytes; comments make it longer.
const MAX_SIGNATURE_BYTES: u64 = 4 * 1024;

/// A public key the supervisor trusts, under the name operators gave it.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    pub name: String,
    /// minisign's key id, as `minisign` prints it (16 hex digits).
    pub key_id: String,
    key: minisign_verify::PublicKey,
}

impl TrustedKey {
    /// Reads a key from a minisign public key: its base64 line alone, or a
    /// whole `minisign.pub` file (comment line, then the key).
    pub fn parse(name: &str, text: &str) -> Result<TrustedKey, String> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| "is empty; expected a minisign public key (RW...)".to_string())?;
        let key = minisign_verify::PublicKey::from_base64(line)
            .map_err(|e| format!("`{line}` is not a minisign public key: {e}"))?;
        let key_id =
            key_id_of(line, 42).ok_or_else(|| format!("`{line}` is not a minisign public key"))?;
        Ok(TrustedKey {
            name: name.to_string(),
            key_id,
            key,
        })
    }
}

/// minisign's key id from a base64 blob (key or signature) of `len` bytes:
/// bytes 2..10, printed as a little-endian number.
fn key_id_of(b64: &str, len: usize) -> Option<String> {
    use base64::Engine;
    let bin = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    if bin.len() != len {
        return None;
    }
    let id: [u8; 8] = bin[2..10].try_into().ok()?;
    Some(format!("{:016X}", u64::from_le_bytes(id)))
}

/// What an instance runs, as `inspect`, health answers and metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunIdentity {
    /// The executable's SHA-256: of the bytes executed when `sealed`, else
    /// of the file as opened for the start.
    pub sha256: Option<String>,
    /// The child executes a sealed copy of the checked bytes.
    pub sealed: bool,
    /// Who signed the plugin, when a trusted key did.
    pub signer: Option<Signer>,
}

/// What a supervisor does with signatures.
#[derive(Clone, Debug, Default)]
pub struct SignaturePolicy {
    pub trusted: Vec<TrustedKey>,
    /// Refuse plugins without a valid signature by a trusted key.
    pub require: bool,
}

/// Who signed what runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signer {
    /// The trusted key's name in the supervisor config.
    pub name: String,
    pub key_id: String,
    /// The signature's trusted comment (signed too), e.g. who and when.
    pub comment: String,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (key {})", self.name, self.key_id)
    }
}

impl SignaturePolicy {
    /// Whether signatures are checked at all: with a trusted key listed.
    /// Without one, a plugin's signature cannot be verified and is not
    /// looked at (and `require` is refused by the config).
    pub fn active(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Whether a start of the plugin in `dir` checks a signature, so its
    /// executable must be sealed to compare the bytes that run.
    pub fn applies_to(&self, dir: &Path) -> bool {
        self.active() && (self.require || dir.join(SIGNATURE_FILE).symlink_metadata().is_ok())
    }

    /// Checks the plugin's signature: `manifest_sha256` is the digest of
    /// the manifest text that was parsed, `exec_sha256` that of the bytes
    /// that will run (`None` when they were not sealed). `Ok(None)`: not
    /// signed, and that is allowed. Every refusal names the file at fault.
    pub fn check(
        &self,
        manifest: &crate::manifest::Manifest,
        exec_sha256: Option<&str>,
    ) -> Result<Option<Signer>, String> {
        if !self.active() {
            return Ok(None);
        }
        let dir = &manifest.dir;
        let sig_path = dir.join(SIGNATURE_FILE);
        let sig_text = match read_small(&sig_path, MAX_SIGNATURE_BYTES) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.require {
                    return Err(format!(
                        "{} is unsigned ({} not found) and the supervisor config sets require_signatures: true; sign it with `plugvisor sign --key SECRET_KEY {}`",
                        manifest.name,
                        sig_path.display(),
                        dir.display()
                    ));
                }
                return Ok(None);
            }
            Err(e) => return Err(format!("cannot read {}: {e}", sig_path.display())),
        };
        let signature = minisign_verify::Signature::decode(&sig_text)
            .map_err(|e| format!("{} is not a minisign signature: {e}", sig_path.display()))?;
        let key_id = sig_text
            .lines()
            .nth(1)
            .and_then(|line| key_id_of(line, 74))
            .ok_or_else(|| format!("{} is not a minisign signature", sig_path.display()))?;
        let key = self
            .trusted
            .iter()
            .find(|k| k.key_id == key_id)
            .ok_or_else(|| {
                format!(
                    "{} is signed by key {key_id}, which is not among the supervisor config's trusted_keys ({})",
                    sig_path.display(),
                    self.trusted
                        .iter()
                        .map(|k| format!("{} {}", k.name, k.key_id))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let sums_path = dir.join(SUMS_FILE);
        let sums = read_small(&sums_path, MAX_SUMS_BYTES).map_err(|e| {
            format!(
                "cannot read {} (what {SIGNATURE_FILE} signs): {e}",
                sums_path.display()
            )
        })?;
        key.key.verify(sums.as_bytes(), &signature, true).map_err(|e| {
            format!(
                "{} does not verify {} with trusted key {} ({}): {e}; the list was changed after signing, or signed with another key",
                sig_path.display(),
                sums_path.display(),
                key.name,
                key.key_id
            )
        })?;
        let entries = parse_sums(&sums).map_err(|e| format!("{}: {e}", sums_path.display()))?;
        let manifest_rel = relative(dir, &manifest.path).ok_or_else(|| {
            format!(
                "{} is outside {}, so {SUMS_FILE} cannot cover it",
                manifest.path.display(),
                dir.display()
            )
        })?;
        let exec_rel = relative(dir, &manifest.exec).ok_or_else(|| {
            format!(
                "{} (exec) is outside the plugin directory {}, so {SUMS_FILE} cannot cover it; move it into the directory to sign it",
                manifest.exec.display(),
                dir.display()
            )
        })?;
        for (required, what) in [
            (&manifest_rel, "the manifest"),
            (&exec_rel, "the executable"),
        ] {
            if !entries.iter().any(|(_, p)| p == required) {
                return Err(format!(
                    "{} does not list {} ({what}), so the signature does not cover it; sign the plugin again",
                    sums_path.display(),
                    required.display()
                ));
            }
        }
        for (listed, rel) in &entries {
            let actual = if *rel == manifest_rel {
                manifest.source_sha256.clone()
            } else if *rel == exec_rel {
                exec_sha256.map(str::to_string).ok_or_else(|| {
                    format!("{} was not sealed for the check", manifest.exec.display())
                })?
            } else {
                crate::isolation::pin::sha256_file(&dir.join(rel)).map_err(|e| {
                    format!(
                        "cannot read {} (listed in {SUMS_FILE}): {e}",
                        dir.join(rel).display()
                    )
                })?
            };
            if !listed.eq_ignore_ascii_case(&actual) {
                return Err(format!(
                    "{} changed after signing: {SUMS_FILE} (signed by {} {}) lists sha256 {listed}, the file has {actual}; refusing to run it",
                    dir.join(rel).display(),
                    key.name,
                    key.key_id
                ));
            }
        }
        Ok(Some(Signer {
            name: key.name.clone(),
            key_id: key.key_id.clone(),
            comment: signature.trusted_comment().to_string(),
        }))
    }
}

impl SignaturePolicy {
    /// What tells two policies apart: each key's name and id, and
    /// `require`.
    pub fn summary(&self) -> String {
        let keys: Vec<String> = self
            .trusted
            .iter()
            .map(|k| format!("{} {}", k.name, k.key_id))
            .collect();
        format!("[{}] require: {}", keys.join(", "), self.require)
    }
}

/// After the policy changed (a reload): checks what each supervised plugin
/// runs now against `policy`, the manifest as it was parsed and the
/// executable's digest from its start, and the other listed files as they
/// are now. Returns the plugins that would be refused, with why, and posts
/// an event on each (state unchanged): they keep running, since what runs
/// was checked when it started and stopping it on a config change would be
/// an outage no one asked for; their next start (a restart, a crash, an
/// upgrade) checks the new policy and is refused.
pub(crate) async fn recheck_running(
    registry: &crate::plugin::Registry,
    host: &crate::host::Host,
    policy: std::sync::Arc<SignaturePolicy>,
) -> Vec<(String, String)> {
    use crate::status::{Event, EventDetail};
    // What runs, per plugin: the manifest and each live replica's identity.
    let running: Vec<_> = registry
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(name, handle)| {
            let board = handle.common.board.lock();
            let live: Vec<(usize, String, RunIdentity)> = board
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| r.pid.is_some())
                .map(|(i, r)| (i, r.instance.clone(), r.identity.clone()))
                .collect();
            (!live.is_empty()).then(|| {
                (
                    name.clone(),
                    handle.common.clone(),
                    board.spec.manifest.clone(),
                    live,
                )
            })
        })
        .collect();
    // Reads signatures and listed files: off the runtime's workers.
    let checked = tokio::task::spawn_blocking(move || {
        running
            .into_iter()
            .filter_map(|(name, common, manifest, live)| {
                live.into_iter().find_map(|(index, instance, identity)| {
                    policy
                        .check(&manifest, identity.sha256.as_deref())
                        .err()
                        .map(|why| (name.clone(), common.clone(), index, instance, why))
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut refused = Vec::with_capacity(checked.len());
    for (name, common, index, instance, why) in checked {
        let state = common.board.lock().replicas[index].state;
        let reason = format!(
            "what runs no longer passes the reloaded trusted_keys/require_signatures: {why}; it keeps running, and its next start is refused"
        );
        tracing::warn!(plugin = %name, instance, "{reason}");
        let event = Event {
            time: std::time::SystemTime::now(),
            plugin: name.clone(),
            replica: index,
            instance,
            state,
            reason,
            detail: EventDetail::default(),
        };
        common.board.record(&event);
        let _ = host.events.send(event);
        refused.push((name, why));
    }
    refused
}

/// What a start would say of the plugin's signature, checked offline
/// (`plugvisor check`): the executable's digest is read from the file.
pub fn check_offline(
    policy: &SignaturePolicy,
    manifest: &crate::manifest::Manifest,
) -> Result<Option<Signer>, String> {
    if !policy.applies_to(&manifest.dir) {
        return Ok(None);
    }
    let digest = crate::isolation::pin::sha256_file(&manifest.exec)
        .map_err(|e| format!("cannot read {}: {e}", manifest.exec.display()))?;
    policy.check(manifest, Some(&digest))
}

/// Reads a small file, refusing one over `max` bytes or not regular.
fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than the {max}-byte limit"
        )));
    }
    Ok(text)
}

/// `path` relative to `dir`, without `.` components; `None` when outside.
fn relative(dir: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(dir).ok()?;
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Parses `sha256sum` output: `<64 hex digits><space><space or *><path>`
/// per line, paths relative to the plugin directory and inside it.
pub fn parse_sums(text: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = || {
            format!(
                "line {n}: expected `<sha256 in hex>  <path>` as sha256sum prints it, got `{line}`"
            )
        };
        let (digest, rest) = line.split_at_checked(64).ok_or_else(bad)?;
        if !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let path = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(bad)?;
        let rel = Path::new(path);
        let mut clean = PathBuf::new();
        for c in rel.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(part) => clean.push(part),
                _ => {
                    return Err(format!(
                        "line {n}: `{path}` must be a path inside the plugin directory (no `..`, not absolute)"
                    ));
                }
            }
        }
        if clean.as_os_str().is_empty() {
            return Err(bad());
        }
        if entries.iter().any(|(_, p)| *p == clean) {
            return Err(format!("line {n}: `{path}` is listed twice"));
        }
        entries.push((digest.to_ascii_lowercase(), clean));
    }
    Ok(entries)
}

/// The `plugin.sums` text for `files` (relative to `dir`), as sha256sum
/// prints it: what `plugvisor sign` signs.
pub fn sums_for(dir: &Path, files: &[PathBuf]) -> std::io::Result<String> {
    let mut text = String::new();
    for rel in files {
        let digest = crate::isolation::pin::sha256_file(&dir.join(rel))?;
        text.push_str(&format!("{digest}  {}\n", rel.display()));
    }
    Ok(text)
}

/// The files a signature of `manifest` must cover, relative to its
/// directory: the manifest, then the executable.
pub fn covered_files(manifest: &crate::manifest::Manifest) -> Result<Vec<PathBuf>, String> {
    let m = relative(&manifest.dir, &manifest.path)
        .ok_or_else(|| format!("{} is outside its directory", manifest.path.display()))?;
    let e = relative(&manifest.dir, &manifest.exec).ok_or_else(|| {
        format!(
            "{} (exec) is outside the plugin directory {}; a signature can only cover files inside it",
            manifest.exec.display(),
            manifest.dir.display()
        )
    })?;
    Ok(vec![m, e])
}

/// The SHA-256 of `bytes`, lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_like_sha256sum_prints_them() {
        let d = "a".repeat(64);
        let text = format!("{d}  plugin.yaml\n{d} *./bin/exe\n\n");
        let e = parse_sums(&text).unwrap();
        assert_eq!(e[0].1, PathBuf::from("plugin.yaml"));
        assert_eq!(e[1].1, PathBuf::from("bin/exe"));
        for (bad, needle) in [
            (format!("{d} plugin.yaml"), "line 1"),
            (format!("{d}  ../etc/passwd"), "inside the plugin directory"),
            (format!("{d}  /etc/passwd"), "inside the plugin directory"),
            (format!("{}  x", "g".repeat(64)), "line 1"),
            (format!("{d}  x\n{d}  ./x"), "listed twice"),
            ("short  x".to_string(), "line 1"),
        ] {
            let e = parse_sums(&bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    /// A plugin directory: manifest, executable, a data file.
    struct Plugin {
        dir: tempfile::TempDir,
        key: minisign::KeyPair,
    }

    impl Plugin {
        fn new() -> Plugin {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("plugin.yaml"),
                "name: echo\nversion: 1.2.0\nexec: ./bin/echo\n",
            )
            .unwrap();
            std::fs::create_dir(dir.path().join("bin")).unwrap();
            let exe = dir.path().join("bin/echo");
            std::fs::write(&exe, "#!/bin/sh\nexit 0\n").unwrap();
            std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::write(dir.path().join("data.txt"), "v1").unwrap();
            Plugin {
                dir,
                key: minisign::KeyPair::generate_unencrypted_keypair().unwrap(),
            }
        }

        fn manifest(&self) -> crate::manifest::Manifest {
            crate::manifest::Manifest::load(&self.dir.path().join("plugin.yaml")).unwrap()
        }

        fn sign_with(&self, key: &minisign::KeyPair, files: &[&str]) {
            let files: Vec<PathBuf> = files.iter().map(PathBuf::from).collect();
            let sums = sums_for(self.dir.path(), &files).unwrap();
            let sig =
                minisign::sign(None, &key.sk, sums.as_bytes(), Some("ci build 7"), None).unwrap();
            std::fs::write(self.dir.path().join(SUMS_FILE), sums).unwrap();
            std::fs::write(self.dir.path().join(SIGNATURE_FILE), sig.into_string()).unwrap();
        }

        fn sign(&self) {
            self.sign_with(&self.key, &["plugin.yaml", "bin/echo", "data.txt"]);
        }

        fn policy(&self, require: bool) -> SignaturePolicy {
            SignaturePolicy {
                trusted: vec![TrustedKey::parse("release", &self.key.pk.to_base64()).unwrap()],
                require,
            }
        }

        /// What a start checks: the digest of the executable as read now.
        fn check(&self, policy: &SignaturePolicy) -> Result<Option<Signer>, String> {
            check_offline(policy, &self.manifest())
        }
    }

    #[test]
    fn a_signed_plugin_verifies_and_names_its_signer() {
        let p = Plugin::new();
        p.sign();
        let signer = p.check(&p.policy(true)).unwrap().expect("signed");
        assert_eq!(signer.name, "release");
        assert_eq!(signer.comment, "ci build 7");
        assert_eq!(signer.key_id, p.policy(true).trusted[0].key_id);
    }

    #[test]
    fn a_file_changed_after_signing_is_refused_naming_it() {
        for (file, bytes) in [
            (
                "plugin.yaml",
                "name: echo\nversion: 1.2.1\nexec: ./bin/echo\n",
            ),
            ("bin/echo", "#!/bin/sh\nexit 1\n"),
            ("data.txt", "v2"),
        ] {
            let p = Plugin::new();
            p.sign();
            std::fs::write(p.dir.path().join(file), bytes).unwrap();
            let e = p.check(&p.policy(false)).unwrap_err();
            let path = p.dir.path().join(file);
            assert!(
                e.contains(&format!("{} changed after signing", path.display())),
                "{file}: {e}"
            );
        }
    }

    #[test]
    fn an_unsigned_plugin_is_refused_only_when_signatures_are_required() {
        let p = Plugin::new();
        assert_eq!(p.check(&p.policy(false)).unwrap(), None);
        let e = p.check(&p.policy(true)).unwrap_err();
        assert!(e.contains("echo is unsigned"), "{e}");
        assert!(
            e.contains(SIGNATURE_FILE) && e.contains("require_signatures"),
            "{e}"
        );
        // No trusted key: nothing can be verified, nothing is checked.
        assert_eq!(p.check(&SignaturePolicy::default()).unwrap(), None);
    }

    #[test]
    fn unknown_keys_forged_lists_and_partial_lists_are_refused() {
        let p = Plugin::new();
        let stranger = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        p.sign_with(&stranger, &["plugin.yaml", "bin/echo"]);
        let e = p.check(&p.policy(false)).unwrap_err();
        assert!(
            e.contains("not among the supervisor config's trusted_keys"),
            "{e}"
        );

        // The list edited to match a changed file: its signature fails.
        p.sign();
        std::fs::write(p.dir.path().join("data.txt"), "v2").unwrap();
        let sums = sums_for(
            p.dir.path(),
            &["plugin.yaml".into(), "bin/echo".into(), "data.txt".into()],
        )
        .unwrap();
        std::fs::write(p.dir.path().join(SUMS_FILE), sums).unwrap();
        let e = p.check(&p.policy(false)).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        assert!(e.contains(SUMS_FILE), "{e}");

        // A list that leaves the executable out covers nothing that runs.
        p.sign_with(&p.key, &["plugin.yaml"]);
        let e = p.check(&p.policy(false)).unwrap_err();
        assert!(e.contains("does not list bin/echo (the executable)"), "{e}");

        // Garbage where the signature should be.
        std::fs::write(p.dir.path().join(SIGNATURE_FILE), "not a signature").unwrap();
        let e = p.check(&p.policy(false)).unwrap_err();
        assert!(e.contains("is not a minisign signature"), "{e}");
    }

    #[test]
    fn key_ids_read_as_minisign_prints_them() {
        // minisign prints a key's id as the little-endian number of bytes
        // 2..10 of its blob.
        use base64::Engine;
        let mut blob = vec![0x45, 0x64, 0x88, 0x1f, 0x9d, 0x1e, 0xfb, 0x27, 0x0e, 0x7c];
        blob.extend([7u8; 32]);
        let pk = base64::engine::general_purpose::STANDARD.encode(&blob);
        let pk = pk.as_str();
        let key = TrustedKey::parse("release", pk).unwrap();
        assert_eq!(key.key_id.len(), 16);
        assert_eq!(key.key_id, "7C0E27FB1E9D1F88");
        let file = format!("untrusted comment: minisign public key\n{pk}\n");
        assert_eq!(TrustedKey::parse("r", &file).unwrap().key_id, key.key_id);
        assert!(TrustedKey::parse("r", "RWQnotakey").is_err());
        assert!(TrustedKey::parse("r", "").is_err());
    }
}
