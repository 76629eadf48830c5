//! Miners' reports are signed with their node key (secp256k1, as an Ethereum wallet signs) and
//! checked by the queue against the address the miner registered. What is signed names the
//! task, the miner, the assignment's nonce, the kind of report and its content, so a report
//! cannot be forged by another party, moved to another task or assignment, or changed.
//! A reveal that matches its signed precommit is the one report the queue takes without a
//! check of its own ([`authenticated_by_precommit`]).

use super::messages::{MinerReport, ReportKind};
use crate::chain::node_key::NodeKey;
use ethers::core::k256::ecdsa::{RecoveryId, Signature as K256Signature, VerifyingKey};
use ethers::types::{Address, Signature, H256, U256};
use secp256k1::{Message, PublicKey, SecretKey, SECP256K1};
use std::collections::HashMap;

/// Whether a report of this kind must be signed. Every claim is (ack, precommit, commit,
/// failure, refusal); streamed tokens are not: they are a preview the client sees before the
/// result is validated, the validated result is what counts, and signing each one measured
/// too dear (`bench load`: a signature and a recovery per token on the queue's thread
/// halved throughput and pushed tasks past their deadlines).
pub fn needs_signature(kind: &ReportKind) -> bool {
    !matches!(kind, ReportKind::Token { .. })
}

/// Whether the report is a reveal that matches the assignment's precommitted hash. Such a
/// reveal needs no signature check: the precommit that carried the hash was checked, and the
/// hash names the miner, so whoever sent the reveal sent exactly the result the miner signed
/// for. A reveal that does not match is checked, so that only the miner's own wrong reveal
/// counts against it (a forged one is refused, not blamed on the miner).
pub fn authenticated_by_precommit(report: &MinerReport, precommit_hash: Option<&str>) -> bool {
    match (&report.kind, precommit_hash) {
        (ReportKind::Commit { result }, Some(hash)) => result.commitment_hex(&report.miner) == hash,
        _ => false,
    }
}

/// Bumped when what is signed changes.
pub const REPORT_DOMAIN: &[u8] = b"cortensor/miner-report/v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the report is not signed")]
    Unsigned,
    #[error("the signature does not recover: {0}")]
    Malformed(String),
    #[error("signed by {signer:?}, not by the miner's registered key {expected:?}")]
    WrongSigner { signer: Address, expected: Address },
}

/// keccak256 over the report's fields (length-prefixed, so no two reports encode alike).
pub fn report_digest(report: &MinerReport) -> H256 {
    let mut bytes = Vec::with_capacity(128);
    let mut field = |b: &[u8]| {
        bytes.extend_from_slice(&(b.len() as u64).to_be_bytes());
        bytes.extend_from_slice(b);
    };
    field(REPORT_DOMAIN);
    field(&report.key.session_id.to_be_bytes());
    field(&report.key.task_id.to_be_bytes());
    field(report.miner.as_bytes());
    field(&report.nonce.to_be_bytes());
    match &report.kind {
        ReportKind::Ack => field(b"ack"),
        ReportKind::Token { index, text } => {
            field(b"token");
            field(&(*index as u64).to_be_bytes());
            field(text.as_bytes());
        }
        ReportKind::Precommit { hash } => {
            field(b"precommit");
            field(hash.as_bytes());
        }
        ReportKind::Commit { result } => {
            field(b"commit");
            field(&result.commitment_bytes(&report.miner));
        }
        ReportKind::Failed { error } => {
            field(b"failed");
            field(error.as_bytes());
        }
        ReportKind::Refused { error } => {
            field(b"refused");
            field(error.as_bytes());
        }
    }
    H256(ethers::utils::keccak256(bytes))
}

/// Signs the report with `key` (replacing any signature it had), as an Ethereum wallet signs
/// a hash: RFC 6979, low S, `v` = 27 + recovery id.
pub fn sign(report: &mut MinerReport, key: &NodeKey) {
    let digest = report_digest(report);
    let secret = SecretKey::from_slice(&key.wallet.signer().to_bytes())
        .expect("a wallet's key is a valid secp256k1 secret key");
    let (recovery, rs) = SECP256K1
        .sign_ecdsa_recoverable(&Message::from_digest(digest.0), &secret)
        .serialize_compact();
    report.signature = Some(Signature {
        r: U256::from_big_endian(&rs[..32]),
        s: U256::from_big_endian(&rs[32..]),
        v: 27 + recovery.to_i32() as u64,
    });
}

/// Checks that the report was signed by `expected` (recovering the signer's key; see
/// [`SignerKeys`] for the cheaper check of a key seen before).
pub fn verify(report: &MinerReport, expected: Address) -> Result<(), SignatureError> {
    SignerKeys::default().verify(report, expected)
}

/// At most this many keys are remembered (one per registered node; beyond it, forgotten).
const MAX_SIGNER_KEYS: usize = 4096;

/// The public keys of addresses that signed a valid report before. Recovering a signer costs
/// two elliptic-curve multiplications (secp256k1 recovery verifies what it recovered); checking
/// a signature against a known key costs one, and runs in libsecp256k1, so a node's later
/// reports cost a sixth.
#[derive(Default)]
pub struct SignerKeys {
    keys: HashMap<Address, PublicKey>,
}

impl SignerKeys {
    /// Checks that the report was signed by `expected`.
    pub fn verify(
        &mut self,
        report: &MinerReport,
        expected: Address,
    ) -> Result<(), SignatureError> {
        let signature = report.signature.as_ref().ok_or(SignatureError::Unsigned)?;
        let digest = report_digest(report);
        let malformed = |e: &dyn std::fmt::Display| SignatureError::Malformed(e.to_string());
        let (sig, recovery) = k256_signature(signature).map_err(|e| malformed(&e))?;
        if let Some(key) = self.keys.get(&expected) {
            // `sig` is low-S, as libsecp256k1 requires.
            let message = Message::from_digest(digest.0);
            if secp256k1::ecdsa::Signature::from_compact(&sig.to_bytes())
                .is_ok_and(|sig| SECP256K1.verify_ecdsa(&message, &sig, key).is_ok())
            {
                return Ok(());
            }
            // Not the known key's: say whose it is.
        }
        let key = VerifyingKey::recover_from_prehash(digest.as_bytes(), &sig, recovery)
            .map_err(|e| malformed(&e))?;
        let signer = ethers::utils::public_key_to_address(&key);
        if signer != expected {
            return Err(SignatureError::WrongSigner { signer, expected });
        }
        let public = PublicKey::from_slice(key.to_encoded_point(false).as_bytes())
            .map_err(|e| malformed(&e))?;
        if self.keys.len() >= MAX_SIGNER_KEYS {
            self.keys.clear();
        }
        self.keys.insert(expected, public);
        Ok(())
    }
}

/// The signature as k256 takes it: low-S (flipping the recovery id with it), as ethers
/// recovers it.
fn k256_signature(
    signature: &Signature,
) -> Result<(K256Signature, RecoveryId), ethers::core::k256::ecdsa::Error> {
    let (mut r, mut s) = ([0u8; 32], [0u8; 32]);
    signature.r.to_big_endian(&mut r);
    signature.s.to_big_endian(&mut s);
    let sig = K256Signature::from_scalars(r, s)?;
    // ethers' reading of `v`: raw, pre-EIP-155 (27/28…) or EIP-155.
    let v = match signature.v {
        v @ 0..=26 => (v % 4) as u8,
        v @ 27..=34 => ((v - 27) % 4) as u8,
        v => ((v - 1) % 2) as u8,
    };
    let recovery = RecoveryId::from_byte(v).ok_or_else(ethers::core::k256::ecdsa::Error::new)?;
    Ok(match sig.normalize_s() {
        Some(low) => (
            low,
            RecoveryId::new(!recovery.is_y_odd(), recovery.is_x_reduced()),
        ),
        None => (sig, recovery),
    })
}
