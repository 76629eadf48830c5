//! A node's key: the secp256k1 key (an Ethereum wallet) a miner or validator is paid at and
//! withdraws with. Kept as hex in `<dir>/<node id>.key`, readable by its owner only, and made
//! on first use.

use super::ChainError;
use ethers::signers::{LocalWallet, Signer};
use ethers::types::Address;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct NodeKey {
    pub node: String,
    pub wallet: LocalWallet,
}

fn key_error(path: &Path) -> impl Fn(String) -> ChainError + '_ {
    move |e| ChainError::Evm(format!("node key {}: {e}", path.display()))
}

impl NodeKey {
    pub fn address(&self) -> Address {
        self.wallet.address()
    }

    /// The private key, `0x` and 64 hex digits.
    pub fn private_key_hex(&self) -> String {
        format!("0x{}", hex::encode(self.wallet.signer().to_bytes()))
    }

    /// The same key, named by its address (`0x…`, lower case): a remote node's id.
    pub fn named_by_address(self) -> Self {
        Self {
            node: format!("{:?}", self.wallet.address()),
            wallet: self.wallet,
        }
    }

    /// A fresh random key, kept nowhere (temporary testnets).
    pub fn random(node: &str) -> Self {
        Self {
            node: node.to_string(),
            wallet: LocalWallet::new(&mut rand::thread_rng()),
        }
    }

    /// Parses a hex private key (with or without `0x`).
    pub fn from_hex(node: &str, hex_key: &str) -> Result<Self, ChainError> {
        let wallet = hex_key
            .trim()
            .parse::<LocalWallet>()
            .map_err(|e| ChainError::Evm(format!("node {node}: not a private key: {e}")))?;
        Ok(Self {
            node: node.to_string(),
            wallet,
        })
    }

    pub fn path(dir: &Path, node: &str) -> PathBuf {
        dir.join(format!("{node}.key"))
    }

    /// Reads `<dir>/<node>.key`.
    pub fn load(dir: &Path, node: &str) -> Result<Self, ChainError> {
        Self::load_file(&Self::path(dir, node), node)
    }

    /// Reads a key file, which only its owner may read (as ssh refuses a private key others
    /// can read: such a key may be known to them already).
    pub fn load_file(path: &Path, node: &str) -> Result<Self, ChainError> {
        check_private(path).map_err(key_error(path))?;
        let text = std::fs::read_to_string(path).map_err(|e| key_error(path)(e.to_string()))?;
        Self::from_hex(node, &text).map_err(|e| key_error(path)(e.to_string()))
    }

    /// Reads `<dir>/<node>.key`, or makes a new key and writes it there first.
    pub fn load_or_create(dir: &Path, node: &str) -> Result<Self, ChainError> {
        let path = Self::path(dir, node);
        if path.exists() {
            return Self::load(dir, node);
        }
        let key = Self::random(node);
        std::fs::create_dir_all(dir).map_err(|e| key_error(&path)(e.to_string()))?;
        let line = format!("{}\n", key.private_key_hex());
        write_private(&path, line.as_bytes()).map_err(|e| key_error(&path)(e.to_string()))?;
        Ok(key)
    }
}

/// Refuses a file that its group or others may read or write.
#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "permissions {:04o} are too open: others can read this private key; run `chmod 600 {}`",
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path) -> Result<(), String> {
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
