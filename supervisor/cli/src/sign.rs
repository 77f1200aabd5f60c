//! `plugvisor keygen` and `plugvisor sign`: minisign keys, and signatures of
//! plugin directories the supervisor checks (see `plugvisor::signature`).
//!
//! The files are the stock tools' formats: keys `minisign` reads and
//! writes, `plugin.sums` as `sha256sum` prints it, and `plugin.sums.minisig`
//! as `minisign -Sm plugin.sums` makes it.

use anyhow::Context;
use plugvisor::manifest::{MANIFEST_FILE, Manifest};
use plugvisor::signature::{SIGNATURE_FILE, SUMS_FILE};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes a new key pair: `<out>.key` (secret, mode 0600, not
/// password-protected, as `minisign -G -W` makes) and `<out>.pub`. Prints
/// the public key for the supervisor config's `trusted_keys`.
pub fn keygen(out: &Path, force: bool) -> anyhow::Result<i32> {
    let secret_path = with_suffix(out, "key");
    let public_path = with_suffix(out, "pub");
    for path in [&secret_path, &public_path] {
        if !force && path.symlink_metadata().is_ok() {
            anyhow::bail!(
                "{} exists; pass --force to replace it (a replaced secret key cannot sign for the old public key)",
                path.display()
            );
        }
    }
    let pair = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| anyhow::anyhow!("cannot generate a key pair: {e}"))?;
    let secret = pair
        .sk
        .to_box(None)
        .map_err(|e| anyhow::anyhow!("cannot encode the secret key: {e}"))?
        .into_string();
    let public_box = pair
        .pk
        .to_box()
        .map_err(|e| anyhow::anyhow!("cannot encode the public key: {e}"))?;
    write_new(&secret_path, secret.as_bytes(), 0o600, force)?;
    write_new(
        &public_path,
        public_box.into_string().as_bytes(),
        0o644,
        force,
    )?;
    let public = pair.pk.to_base64();
    println!("secret key: {} (keep it private)", secret_path.display());
    println!("public key: {}", public_path.display());
    println!("trust it in plugvisor.yaml:");
    println!("  trusted_keys:");
    println!("    - name: <who signs with it>");
    println!("      key: {public}");
    Ok(0)
}

/// Signs the plugin in `dir`: writes `plugin.sums` (the SHA-256 of its
/// manifest, its executable and `extra` files) and `plugin.sums.minisig`.
pub fn sign(
    dir: &Path,
    key: &Path,
    extra: &[PathBuf],
    comment: Option<&str>,
) -> anyhow::Result<i32> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = Manifest::load(&manifest_path)?;
    let mut files = plugvisor::signature::covered_files(&manifest).map_err(anyhow::Error::msg)?;
    for file in extra {
        let rel = file.strip_prefix(dir).unwrap_or(file).to_path_buf();
        if !dir.join(&rel).is_file() {
            anyhow::bail!(
                "{}: not a file in {}; list files relative to the plugin directory",
                file.display(),
                dir.display()
            );
        }
        if !files.contains(&rel) {
            files.push(rel);
        }
    }
    let text = std::fs::read_to_string(key)
        .with_context(|| format!("cannot read the secret key {}", key.display()))?;
    let parse = || {
        minisign::SecretKeyBox::from_string(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a minisign secret key: {e}", key.display()))
    };
    // An unencrypted key (`plugvisor keygen`, `minisign -G -W`) is used as
    // it is; an encrypted one asks for its password.
    let sk = match parse()?.into_unencrypted_secret_key() {
        Ok(sk) => sk,
        Err(_) => parse()?
            .into_secret_key(None)
            .map_err(|e| anyhow::anyhow!("cannot use the secret key {}: {e}", key.display()))?,
    };
    let sums = plugvisor::signature::sums_for(dir, &files)
        .with_context(|| format!("cannot hash the files of {}", dir.display()))?;
    let trusted = match comment {
        Some(c) => c.to_string(),
        None => format!(
            "plugin {} {} signed at {}",
            manifest.name,
            manifest.version,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
    };
    if trusted.contains('\n') {
        anyhow::bail!("--comment must be one line");
    }
    let signature = minisign::sign(None, &sk, sums.as_bytes(), Some(&trusted), None)
        .map_err(|e| anyhow::anyhow!("cannot sign: {e}"))?;
    // The list first, then its signature: a reader between the two sees a
    // signature that does not match, never an unsigned change passing.
    replace(&dir.join(SUMS_FILE), sums.as_bytes())?;
    replace(
        &dir.join(SIGNATURE_FILE),
        signature.into_string().as_bytes(),
    )?;
    println!(
        "signed {} {}: {} ({})",
        manifest.name,
        manifest.version,
        dir.join(SIGNATURE_FILE).display(),
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(0)
}

fn with_suffix(out: &Path, ext: &str) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

/// Creates `path` with `mode` (replacing it only with `force`).
fn write_new(path: &Path, bytes: &[u8], mode: u32, force: bool) -> anyhow::Result<()> {
    if force {
        let _ = std::fs::remove_file(path);
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Replaces `path` atomically (a temp file in the same directory, renamed).
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let tmp_path = tmp.into_temp_path();
    std::fs::set_permissions(
        &tmp_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    tmp_path
        .persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
