//! Miners' reports are signed with their node key (secp256k1, as an Ethereum wallet signs) and
//! checked by the queue against the address the miner registered. What is signed names the
//! task, the miner, the assignment's nonce, the kind of report and its content, so a report
//! cannot be forged by another party, moved to another task or assignment, or changed.

use super::messages::{MinerReport, ReportKind};
use crate::chain::node_key::NodeKey;
use ethers::types::{Address, H256};

/// Whether a report of this kind must be signed. Every claim is (ack, precommit, commit,
/// failure, refusal); streamed tokens are not: they are a preview the client sees before the
/// result is validated, the validated result is what counts, and signing each one measured
/// too dear (`bench load`: a signature and a recovery per token on the queue's thread
/// halved throughput and pushed tasks past their deadlines).
pub fn needs_signature(kind: &ReportKind) -> bool {
    !matches!(kind, ReportKind::Token { .. })
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

/// Signs the report with `key` (replacing any signature it had).
pub fn sign(report: &mut MinerReport, key: &NodeKey) {
    let digest = report_digest(report);
    report.signature = Some(
        key.wallet
            .sign_hash(digest)
            .expect("signing a 32-byte digest with a local key cannot fail"),
    );
}

/// Checks that the report was signed by `expected`.
pub fn verify(report: &MinerReport, expected: Address) -> Result<(), SignatureError> {
    let signature = report.signature.as_ref().ok_or(SignatureError::Unsigned)?;
    let signer = signature
        .recover(report_digest(report))
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    if signer != expected {
        return Err(SignatureError::WrongSigner { signer, expected });
    }
    Ok(())
}
