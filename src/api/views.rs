//! The JSON shapes of sessions and tasks as clients see them (Cortensor's field names).

use crate::chain::TaskTrace;
use crate::session::Session;
use crate::task::{AssignmentState, TaskRecord, TaskState};
use serde_json::{json, Value};

pub fn seconds(ms: u64) -> u64 {
    ms / 1000
}

pub fn session(s: &Session) -> Value {
    let p = &s.params;
    json!({
        "session_id": s.id,
        "id": s.id,
        "owner": s.owner,
        "name": p.name,
        "metadata": p.metadata,
        "min_num_of_nodes": p.min_num_of_nodes,
        "max_num_of_nodes": p.max_num_of_nodes,
        "redundant": p.redundant,
        "num_of_validator_nodes": p.num_of_validator_nodes,
        "mode": u8::from(p.mode),
        "reserve_ephemeral_nodes": p.reserve_ephemeral_nodes,
        "sla": u8::from(p.sla),
        "model_identifier": p.model_identifier,
        "reserve_period": p.reserve_period,
        "max_task_execution_count": p.max_task_execution_count,
        "task_record": p.task_record,
        "validation": p.validation,
        "consensus": p.consensus,
        "disagreement_policy": p.disagreement_policy,
        "poi_threshold": p.poi_threshold,
        "judge_threshold": p.judge_threshold,
        "created_at": seconds(s.created_at_ms),
        "deposit": s.deposit,
        "balance": s.balance,
        "held": s.held,
        "spent": s.spent,
        "tasks_submitted": s.tasks_submitted,
    })
}

pub fn usage(t: &TaskRecord) -> Value {
    let (prompt, completion) = t
        .outcome
        .as_ref()
        .map(|o| (o.result.prompt_tokens, o.result.completion_tokens()))
        .unwrap_or((0, 0));
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Cortensor's task shape plus our details (assignments, charge, error).
pub fn task(t: &TaskRecord) -> Value {
    // The last round's results (a chunked task's earlier rounds are its spans). Their texts
    // are the client's once they are paid for: a task that completed, or one charged for the
    // work done. A task still running, or failed or cancelled without a charge, shows who
    // committed and not what (else a policy that rejects everything, or a cancel right after
    // the reveal, would get the miners' work for nothing).
    let paid = t.state == TaskState::Completed || t.charged > 0;
    let committed: Vec<_> = t
        .last_round()
        .filter(|a| a.state == AssignmentState::Committed)
        .filter_map(|a| {
            a.result
                .as_ref()
                .map(|r| (a.miner.clone(), paid.then(|| r.text.clone())))
        })
        .collect();
    let assignments: Vec<Value> = t
        .assignments
        .iter()
        .map(|a| {
            json!({
                "miner": a.miner,
                "state": format!("{:?}", a.state),
                "assigned_at": a.assigned_at_ms,
                "acked_at": a.acked_at_ms,
                "precommitted_at": a.precommitted_at_ms,
                "committed_at": a.committed_at_ms,
                "precommit_hash": a.precommit_hash,
                "note": a.note,
                "chunk": a.chunk,
            })
        })
        .collect();
    json!({
        "session_id": t.key.session_id,
        "task_id": t.key.task_id,
        "status": t.state.name(),
        "assigned_miners": t.assigned_miners(),
        "created_at": seconds(t.created_at_ms),
        "finished_at": t.finished_at_ms.map(seconds),
        "results": {
            "data": committed.iter().filter_map(|c| c.1.clone()).collect::<Vec<_>>(),
            "miners": committed.iter().map(|c| c.0.clone()).collect::<Vec<_>>(),
        },
        "accepted": t.outcome.as_ref().map(|o| json!({
            "text": o.result.text,
            "finish_reason": o.result.finish_reason,
            "agreeing": o.agreeing,
            "disagreeing": o.disagreeing,
            "alternatives": o.alternatives.iter().map(|(miner, r)| json!({
                "miner": miner,
                "text": r.text,
                "finish_reason": r.finish_reason,
            })).collect::<Vec<_>>(),
        })),
        "validation": t.decision,
        "model": t.model,
        "redundancy": t.redundancy,
        "replacements": t.replacements,
        "resumed": t.resumed,
        "assignments": assignments,
        "chunk_tokens": t.chunk_tokens,
        "spans": t.spans,
        "client_reference": t.client_reference,
        "usage": usage(t),
        "hold": t.hold,
        "charged": t.charged,
        "error": t.error,
    })
}

/// A task's per-stage record on the chain: `recorded` false until it is there (or when its
/// session records settlements only).
pub fn task_on_chain(t: &TaskRecord, trace: Option<&TaskTrace>) -> Value {
    let Some(trace) = trace else {
        return json!({
            "session_id": t.key.session_id,
            "task_id": t.key.task_id,
            "per_stage": t.record_stages,
            "recorded": false,
        });
    };
    let miners: Vec<Value> = trace
        .miners
        .iter()
        .map(|m| {
            json!({
                "miner": m.node,
                "acked": m.acked,
                "precommit_hash": m.precommit.map(|h| format!("0x{}", hex::encode(h))),
                "commit": m.commit.as_ref().map(|c| String::from_utf8_lossy(c).into_owned()),
            })
        })
        .collect();
    json!({
        "session_id": t.key.session_id,
        "task_id": t.key.task_id,
        "per_stage": t.record_stages,
        "recorded": true,
        "data": String::from_utf8_lossy(&trace.data),
        "miners": miners,
        "force_ended": trace.force_ended,
    })
}
