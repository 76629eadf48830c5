//! `GET /metrics` in Prometheus' text format: tasks by state, stage latencies, tokens, miners
//! by state, admission.

use super::ApiState;
use crate::actors::node_pool::ListNodes;
use crate::actors::session_queue::{GetStats, STAGE_BUCKETS_S};
use crate::task::TaskState;
use actix_web::{web, HttpResponse};
use std::fmt::Write;

pub async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    let (Ok(stats), Ok(nodes)) = (
        state.actors.queue.send(GetStats).await,
        state.actors.pool.send(ListNodes).await,
    ) else {
        return HttpResponse::ServiceUnavailable().body("the actors did not answer\n");
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP cortensor_tasks Tasks held by the queue, by state.\n# TYPE cortensor_tasks gauge"
    );
    for s in TaskState::ALL.iter().filter(|s| !s.is_terminal()) {
        let _ = writeln!(
            out,
            "cortensor_tasks{{state=\"{}\"}} {}",
            s.name(),
            stats.live.get(s.name()).unwrap_or(&0)
        );
    }
    let _ = writeln!(out, "# HELP cortensor_tasks_ended_total Tasks that ended, by final state.\n# TYPE cortensor_tasks_ended_total counter");
    for s in TaskState::ALL.iter().filter(|s| s.is_terminal()) {
        let _ = writeln!(
            out,
            "cortensor_tasks_ended_total{{state=\"{}\"}} {}",
            s.name(),
            stats.ended.get(s.name()).unwrap_or(&0)
        );
    }
    let _ = writeln!(out, "# HELP cortensor_stage_seconds Time tasks spent in each state (total: end to end).\n# TYPE cortensor_stage_seconds histogram");
    for (stage, s) in &stats.stages {
        for (bound, count) in STAGE_BUCKETS_S.iter().zip(&s.buckets) {
            let _ = writeln!(
                out,
                "cortensor_stage_seconds_bucket{{stage=\"{stage}\",le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "cortensor_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
            s.count
        );
        let _ = writeln!(
            out,
            "cortensor_stage_seconds_sum{{stage=\"{stage}\"}} {}",
            s.sum_s
        );
        let _ = writeln!(
            out,
            "cortensor_stage_seconds_count{{stage=\"{stage}\"}} {}",
            s.count
        );
    }
    let _ = writeln!(out, "# HELP cortensor_tokens_generated_total Tokens in accepted results.\n# TYPE cortensor_tokens_generated_total counter\ncortensor_tokens_generated_total {}", stats.tokens_generated);
    let _ = writeln!(out, "# HELP cortensor_decode_tokens_per_second Recent generation speed of accepted miners.\n# TYPE cortensor_decode_tokens_per_second gauge\ncortensor_decode_tokens_per_second {:.3}", stats.decode_tokens_per_second);
    let _ = writeln!(out, "# HELP cortensor_network_tasks_total Network tasks (probes of new and released nodes) that ended, by final state.\n# TYPE cortensor_network_tasks_total counter");
    for (state, n) in &stats.network_tasks {
        let _ = writeln!(
            out,
            "cortensor_network_tasks_total{{state=\"{state}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# HELP cortensor_replacements_total Miners replaced on tasks.\n# TYPE cortensor_replacements_total counter\ncortensor_replacements_total {}", stats.replacements);
    let _ = writeln!(out, "# HELP cortensor_rejected_reveals_total Reveals that did not match their precommit.\n# TYPE cortensor_rejected_reveals_total counter\ncortensor_rejected_reveals_total {}", stats.rejected_reveals);
    let _ = writeln!(out, "# HELP cortensor_rejected_reports_total Miners' reports refused for their signature (unsigned, forged, or replayed from another assignment) or their content (a token index, precommit or result out of bounds).\n# TYPE cortensor_rejected_reports_total counter\ncortensor_rejected_reports_total {}", stats.rejected_reports);
    let _ = writeln!(
        out,
        "# HELP cortensor_miners Miners by state.\n# TYPE cortensor_miners gauge"
    );
    for name in ["ephemeral", "reserved", "dedicated", "released", "offline"] {
        let n = nodes
            .iter()
            .filter(|n| {
                serde_json::to_value(n.state)
                    .ok()
                    .and_then(|v| v.as_str().map(|s| s == name))
                    .unwrap_or(false)
            })
            .count();
        let _ = writeln!(out, "cortensor_miners{{state=\"{name}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP cortensor_validators Validators the queue asks (local, and remote ones connected).\n# TYPE cortensor_validators gauge\ncortensor_validators {}", stats.validators);
    let _ = writeln!(out, "# HELP cortensor_http_tasks_in_flight Tasks admitted and not finished.\n# TYPE cortensor_http_tasks_in_flight gauge\ncortensor_http_tasks_in_flight {}", state.admission.in_flight());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out)
}
