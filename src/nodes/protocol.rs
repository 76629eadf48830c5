//! The node protocol: what a router and a remote node (a miner or a validator on another host)
//! say over the router's node WebSocket (Cortensor's port 9001).
//!
//! Every frame is one JSON text message of at most [`MAX_FRAME_BYTES`], tagged by `type`.
//! A connection opens with a login:
//!
//! ```text
//! router → node  challenge {versions, challenge}        32 random bytes, hex
//! node → router  hello {version, role, address, signature}
//!                 signature: the node key over login_digest(challenge, role, address)
//! router → node  welcome {node, heartbeat_ms, offline_after_ms}    or rejected {reason, retry}
//! ```
//!
//! After the welcome the node is known by its address (`0x…`, lower case): that is its id in
//! the pool, on the chain and in its signed reports. A miner then announces its model and
//! backend (`register`), heartbeats, and exchanges task frames: `assign` / `reveal` / `cancel`
//! one way, `report` (ack, tokens, precommit, commit, failures: each claim signed as in
//! `actors::report_signing`) the other. A validator answers each `validate` with `evidence`:
//! the evidence as JSON text, and the node key's signature over [`evidence_digest`] of that
//! exact text, the connection's challenge, the request's id and the task. A frame that does not
//! parse, an unknown type or a version outside the router's range ends the connection with
//! `rejected` naming the problem.

use crate::actors::messages::ReportKind;
use crate::chain::node_key::NodeKey;
use crate::models::engine::GenerateRequest;
use crate::task::TaskKey;
use crate::validation::consensus::Evidence;
use ethers::types::{Address, Signature, H256};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A router accepts [`MIN_VERSION`]..=this.
/// Version 2: validators sign their evidence (version 1 sent it unsigned, so it is refused).
pub const PROTOCOL_VERSION: u32 = 2;
pub const MIN_VERSION: u32 = 2;
/// The largest frame either side accepts (a prompt or a result is at most a request body,
/// 1 MiB by default, plus its JSON escaping).
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Cortensor's node port.
pub const DEFAULT_NODE_PORT: u16 = 9001;
/// Bumped when what a login signs changes.
pub const LOGIN_DOMAIN: &[u8] = b"cortensor/node-login/v1";
/// Bumped when what a validator's evidence signs changes.
pub const EVIDENCE_DOMAIN: &[u8] = b"cortensor/validator-evidence/v1";

/// What a remote node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Miner,
    Validator,
}

/// Frames from the router to a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterFrame {
    Challenge {
        /// The protocol versions the router speaks, lowest and highest.
        versions: [u32; 2],
        /// 32 random bytes, hex.
        challenge: String,
    },
    Welcome {
        /// The node's id on this network (its address).
        node: String,
        /// How often the node should heartbeat.
        heartbeat_ms: u64,
        /// A node silent for this long is taken as gone (and so is a router).
        offline_after_ms: u64,
    },
    /// The router ends the connection: `retry` says whether connecting again may help.
    Rejected {
        reason: String,
        retry: bool,
    },
    Assign {
        key: TaskKey,
        nonce: u64,
        request: GenerateRequest,
        stream_tokens: bool,
    },
    Reveal {
        key: TaskKey,
    },
    Cancel {
        key: TaskKey,
    },
    /// A validator's work: gather evidence about a task's results.
    Validate {
        id: u64,
        validate: WireValidate,
    },
    /// Liveness, every heartbeat interval.
    Ping,
}

/// Frames from a node to the router.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeFrame {
    Hello {
        version: u32,
        role: NodeRole,
        address: Address,
        signature: Signature,
    },
    /// A miner's engine is ready: the model it serves and its backend.
    Register {
        model: String,
        backend: String,
        max_tasks: usize,
    },
    /// A validator is ready.
    ValidatorReady,
    Heartbeat,
    /// The node's engine went down (it will register again when it is back).
    Offline,
    Report {
        key: TaskKey,
        nonce: u64,
        kind: ReportKind,
        signature: Option<Signature>,
    },
    /// A validator's answer to `validate` with the same id: the [`Evidence`] as JSON text,
    /// signed as it is ([`signed_evidence`]).
    Evidence {
        id: u64,
        evidence: String,
        signature: Signature,
    },
}

/// What a validator is asked (the fields of `actors::validator::Validate`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireValidate {
    pub key: TaskKey,
    pub request: GenerateRequest,
    pub results: Vec<(String, crate::task::TaskResult)>,
    pub plan: crate::validation::consensus::ValidationPlan,
    pub seeded: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("not a frame of the node protocol: {0}")]
    Malformed(String),
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("protocol version {got} is not spoken here (this side speaks {min} to {max})")]
    Version { got: u32, min: u32, max: u32 },
    #[error("the login signature does not recover: {0}")]
    BadSignature(String),
    #[error("the login is signed by {signer:?}, not by {claimed:?}")]
    WrongSigner { signer: Address, claimed: Address },
    #[error("the challenge is not 32 bytes of hex")]
    BadChallenge,
    #[error("the evidence's signature does not recover: {0}")]
    BadEvidenceSignature(String),
    #[error("the evidence is signed by {signer:?}, not by the validator {validator:?}")]
    EvidenceWrongSigner { signer: Address, validator: Address },
    #[error("the evidence does not decode: {0}")]
    MalformedEvidence(String),
}

/// A node's id on the network: its address in lower-case hex.
pub fn node_id(address: Address) -> String {
    format!("{address:?}")
}

/// Reads one frame, checking its size first.
pub fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, ProtocolError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge(text.len()));
    }
    serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

pub fn encode<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(frame).expect("frames are plain data and always serialize")
}

/// 32 random bytes, hex.
pub fn new_challenge() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// keccak256 over the login's fields, length-prefixed.
pub fn login_digest(
    challenge: &str,
    role: NodeRole,
    address: Address,
) -> Result<H256, ProtocolError> {
    let challenge = challenge_bytes(challenge)?;
    let role: &[u8] = match role {
        NodeRole::Miner => b"miner",
        NodeRole::Validator => b"validator",
    };
    Ok(keccak_of_fields(&[
        LOGIN_DOMAIN,
        &challenge,
        role,
        address.as_bytes(),
    ]))
}

/// keccak256 over the fields, each prefixed with its length (so no two lists encode alike).
fn keccak_of_fields(fields: &[&[u8]]) -> H256 {
    let mut bytes = Vec::with_capacity(fields.iter().map(|f| 8 + f.len()).sum());
    for field in fields {
        bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
        bytes.extend_from_slice(field);
    }
    H256(ethers::utils::keccak256(bytes))
}

/// keccak256 over a validator's answer, length-prefixed: the connection's challenge (so
/// it cannot be replayed on another connection), the `validate` request's id and task (so it
/// cannot answer another request) and the evidence's exact JSON text.
pub fn evidence_digest(
    challenge: &str,
    id: u64,
    key: TaskKey,
    evidence: &str,
) -> Result<H256, ProtocolError> {
    let challenge = challenge_bytes(challenge)?;
    Ok(keccak_of_fields(&[
        EVIDENCE_DOMAIN,
        &challenge,
        &id.to_be_bytes(),
        &key.session_id.to_be_bytes(),
        &key.task_id.to_be_bytes(),
        evidence.as_bytes(),
    ]))
}

/// A validator's answer to the `validate` request `id` about `key`, signed with its node key.
pub fn signed_evidence(
    challenge: &str,
    id: u64,
    key: TaskKey,
    evidence: &Evidence,
    node_key: &NodeKey,
) -> Result<NodeFrame, ProtocolError> {
    let evidence = encode(evidence);
    let digest = evidence_digest(challenge, id, key, &evidence)?;
    let signature = node_key
        .wallet
        .sign_hash(digest)
        .map_err(|e| ProtocolError::BadEvidenceSignature(e.to_string()))?;
    Ok(NodeFrame::Evidence {
        id,
        evidence,
        signature,
    })
}

/// The evidence of an `evidence` frame, once its signature is checked against the validator's
/// address (the one its login proved).
pub fn open_evidence(
    challenge: &str,
    id: u64,
    key: TaskKey,
    evidence: &str,
    signature: &Signature,
    validator: Address,
) -> Result<Evidence, ProtocolError> {
    let digest = evidence_digest(challenge, id, key, evidence)?;
    let signer = signature
        .recover(digest)
        .map_err(|e| ProtocolError::BadEvidenceSignature(e.to_string()))?;
    if signer != validator {
        return Err(ProtocolError::EvidenceWrongSigner { signer, validator });
    }
    serde_json::from_str(evidence).map_err(|e| ProtocolError::MalformedEvidence(e.to_string()))
}

fn challenge_bytes(challenge: &str) -> Result<Vec<u8>, ProtocolError> {
    let bytes = hex::decode(challenge).map_err(|_| ProtocolError::BadChallenge)?;
    if bytes.len() != 32 {
        return Err(ProtocolError::BadChallenge);
    }
    Ok(bytes)
}

/// The node's answer to a challenge.
pub fn hello(challenge: &str, role: NodeRole, key: &NodeKey) -> Result<NodeFrame, ProtocolError> {
    let digest = login_digest(challenge, role, key.address())?;
    let signature = key
        .wallet
        .sign_hash(digest)
        .map_err(|e| ProtocolError::BadSignature(e.to_string()))?;
    Ok(NodeFrame::Hello {
        version: PROTOCOL_VERSION,
        role,
        address: key.address(),
        signature,
    })
}

/// Checks a hello against the challenge the router sent: the version, and that the key of
/// the address it claims signed it.
pub fn verify_hello(
    challenge: &str,
    version: u32,
    role: NodeRole,
    address: Address,
    signature: &Signature,
) -> Result<(), ProtocolError> {
    if !(MIN_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(ProtocolError::Version {
            got: version,
            min: MIN_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    let digest = login_digest(challenge, role, address)?;
    let signer = signature
        .recover(digest)
        .map_err(|e| ProtocolError::BadSignature(e.to_string()))?;
    if signer != address {
        return Err(ProtocolError::WrongSigner {
            signer,
            claimed: address,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_verifies_only_for_its_challenge_role_and_key() {
        let key = NodeKey::random("n");
        let challenge = new_challenge();
        let NodeFrame::Hello {
            version,
            role,
            address,
            signature,
        } = hello(&challenge, NodeRole::Miner, &key).unwrap()
        else {
            panic!("hello makes a hello");
        };
        assert_eq!(
            verify_hello(&challenge, version, role, address, &signature),
            Ok(())
        );
        // Another challenge (a replayed login), another role, another claimed address.
        assert!(verify_hello(&new_challenge(), version, role, address, &signature).is_err());
        assert!(verify_hello(
            &challenge,
            version,
            NodeRole::Validator,
            address,
            &signature
        )
        .is_err());
        let other = NodeKey::random("m").address();
        assert!(matches!(
            verify_hello(&challenge, version, role, other, &signature),
            Err(ProtocolError::WrongSigner { .. })
        ));
        assert!(matches!(
            verify_hello(&challenge, PROTOCOL_VERSION + 1, role, address, &signature),
            Err(ProtocolError::Version { .. })
        ));
    }

    #[test]
    fn evidence_opens_only_for_its_connection_request_task_content_and_validator() {
        let key = NodeKey::random("v");
        let challenge = new_challenge();
        let task = TaskKey {
            session_id: 2,
            task_id: 7,
        };
        let evidence = Evidence {
            validator: "v".into(),
            miners: vec![crate::validation::consensus::MinerEvidence {
                miner: "m".into(),
                similarity: Some(0.1 + 0.2),
                likelihood: None,
                likelihood_failures: vec![],
                grade: None,
            }],
            errors: vec![],
        };
        let NodeFrame::Evidence {
            id,
            evidence: text,
            signature,
        } = signed_evidence(&challenge, 5, task, &evidence, &key).unwrap()
        else {
            panic!("signed_evidence makes an evidence frame");
        };
        let open = |challenge: &str, id: u64, task: TaskKey, text: &str, signer: Address| {
            open_evidence(challenge, id, task, text, &signature, signer)
        };
        assert_eq!(
            open(&challenge, id, task, &text, key.address()),
            Ok(evidence)
        );
        let other_task = TaskKey {
            session_id: 2,
            task_id: 8,
        };
        let tampered = text.replace("\"errors\":[]", "\"errors\":[\"x\"]");
        assert_ne!(tampered, text);
        for (what, result) in [
            (
                "another connection",
                open(&new_challenge(), id, task, &text, key.address()),
            ),
            (
                "another request",
                open(&challenge, id + 1, task, &text, key.address()),
            ),
            (
                "another task",
                open(&challenge, id, other_task, &text, key.address()),
            ),
            (
                "changed evidence",
                open(&challenge, id, task, &tampered, key.address()),
            ),
            (
                "another validator",
                open(&challenge, id, task, &text, NodeKey::random("w").address()),
            ),
        ] {
            assert!(
                matches!(result, Err(ProtocolError::EvidenceWrongSigner { .. })),
                "{what}: {result:?}"
            );
        }
    }

    #[test]
    fn frames_round_trip_and_unknown_ones_are_refused() {
        let frame = NodeFrame::Report {
            key: TaskKey {
                session_id: 3,
                task_id: 4,
            },
            nonce: 9,
            kind: ReportKind::Token {
                index: 2,
                text: "hé\"".into(),
            },
            signature: None,
        };
        let text = encode(&frame);
        let back: NodeFrame = decode(&text).unwrap();
        assert_eq!(encode(&back), text);
        assert!(matches!(
            decode::<NodeFrame>(r#"{"type":"launch_missiles"}"#),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode::<NodeFrame>(r#"{"type":"register","model":"m","backend":"cpu"}"#),
            Err(ProtocolError::Malformed(_))
        ));
        let huge = "x".repeat(MAX_FRAME_BYTES + 1);
        assert!(matches!(
            decode::<NodeFrame>(&huge),
            Err(ProtocolError::TooLarge(_))
        ));
    }
}
