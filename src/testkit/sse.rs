//! Reading a server-sent-events response as a client does: the JSON of each `data:` line, in
//! order, up to the closing `data: [DONE]`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Lines, Read};

/// The events of one response. Iterating stops at `[DONE]` or at the end of the body;
/// [`SseEvents::done`] tells which.
pub struct SseEvents<R: Read> {
    lines: Lines<BufReader<R>>,
    done: bool,
}

impl<R: Read> SseEvents<R> {
    pub fn new(body: R) -> Self {
        Self {
            lines: BufReader::new(body).lines(),
            done: false,
        }
    }

    /// Whether the stream closed with `data: [DONE]`.
    pub fn done(&self) -> bool {
        self.done
    }
}

impl<R: Read> Iterator for SseEvents<R> {
    type Item = Value;

    /// The next event's JSON. Panics on a body that is not SSE with JSON data (a test has
    /// found a bug), with the offending line.
    fn next(&mut self) -> Option<Value> {
        if self.done {
            return None;
        }
        for line in self.lines.by_ref() {
            let line = line.unwrap_or_else(|e| panic!("reading the stream: {e}"));
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                self.done = true;
                return None;
            }
            return Some(
                serde_json::from_str(data)
                    .unwrap_or_else(|e| panic!("an event that is not JSON ({e}): {data}")),
            );
        }
        None
    }
}
