//! Chat templates: turning a conversation into the prompt text a model was trained on.
//!
//! Templates are Jinja, rendered with minijinja in an environment that mimics Hugging Face
//! transformers' `apply_chat_template`: variables `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`; a `raise_exception(msg)` function; a `strftime_now(fmt)` function;
//! Python string methods (`.strip()`, `.startswith()`, ...) through minijinja-contrib's pycompat;
//! `trim_blocks` and `lstrip_blocks` on, as HF sets them.
//!
//! The rendered text contains special tokens written out (`<|eot_id|>`, `<|im_end|>`, possibly
//! the BOS text), so encode it with `parse_special = true`, and without adding another BOS when
//! the template already writes one.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::tokenizer::Tokenizer;

/// One message of a conversation (`role` is `system`, `user`, `assistant`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template source does not parse.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`.
    #[error("chat template raised: {0}")]
    Raised(String),
    /// Any other failure while rendering (undefined method, bad types, ...).
    #[error("chat template render error: {0}")]
    Render(String),
}

const TEMPLATE_NAME: &str = "chat";

/// Prefix that marks errors produced by `raise_exception`, so they map to [`ChatError::Raised`].
const RAISED_PREFIX: &str = "raise_exception: ";

/// Meta's Llama 3 instruct format.
const LLAMA3_SOURCE: &str = "{{- bos_token }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}";

/// ChatML (Qwen, SmolLM, ...).
const CHATML_SOURCE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}";

/// A compiled chat template plus the BOS/EOS texts it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template. Syntax errors are reported here, not at render time.
    pub fn from_source(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Meta's Llama 3 instruct format: `<|begin_of_text|>`, then per message
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`; the generation prompt
    /// is `<|start_header_id|>assistant<|end_header_id|>\n\n`.
    pub fn llama3() -> ChatTemplate {
        ChatTemplate::builtin(LLAMA3_SOURCE, "<|begin_of_text|>", "<|eot_id|>")
    }

    /// ChatML: per message `<|im_start|>{role}\n{content}<|im_end|>\n`; the generation prompt is
    /// `<|im_start|>assistant\n`.
    pub fn chatml() -> ChatTemplate {
        ChatTemplate::builtin(CHATML_SOURCE, "", "<|im_end|>")
    }

    fn builtin(source: &str, bos: &str, eos: &str) -> ChatTemplate {
        match ChatTemplate::from_source(source, bos, eos) {
            Ok(t) => t,
            // The built-in sources are constants covered by tests; this cannot happen.
            Err(e) => unreachable!("built-in chat template does not compile: {e}"),
        }
    }

    /// The template for a model: the one it carries (e.g. GGUF `tokenizer.chat_template`) when
    /// present, else Llama 3's when the vocabulary has `<|start_header_id|>`, else ChatML.
    /// BOS/EOS texts come from the tokenizer.
    pub fn for_model(
        carried: Option<&str>,
        tokenizer: &Tokenizer,
    ) -> Result<ChatTemplate, ChatError> {
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_bytes(id))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        match carried.filter(|s| !s.trim().is_empty()) {
            Some(src) => {
                ChatTemplate::from_source(src, &text(tokenizer.bos_id()), &text(tokenizer.eos_id()))
            }
            None if tokenizer.token_to_id("<|start_header_id|>").is_some() => {
                Ok(ChatTemplate::llama3())
            }
            None => Ok(ChatTemplate::chatml()),
        }
    }

    /// Renders the conversation; `add_generation_prompt` appends the opening of an assistant turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(ctx).map_err(|e| {
            // raise_exception's message travels in the error detail, possibly wrapped.
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = cur {
                if let Some(m) = err.downcast_ref::<minijinja::Error>() {
                    if let Some(msg) = m.detail().and_then(|d| d.strip_prefix(RAISED_PREFIX)) {
                        return ChatError::Raised(msg.to_string());
                    }
                }
                cur = err.source();
            }
            ChatError::Render(describe(&e))
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// minijinja's error with its source chain, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED_PREFIX}{message}"),
    ))
}

/// HF's `strftime_now(format)`: the current UTC time formatted with the common `strftime`
/// directives (`%Y %m %d %H %M %S %b %B %a %A %y %j %e %p %I %%`); others are kept verbatim.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats Unix time `secs` (UTC) with a subset of strftime.
fn format_utc(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (sod / 3600, sod % 3600 / 60, sod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + (leap && month > 2) as i64;
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_compile() {
        ChatTemplate::llama3();
        ChatTemplate::chatml();
    }

    #[test]
    fn utc_formatting() {
        // 2024-07-26 13:45:09 UTC, a Friday.
        assert_eq!(
            format_utc(1_722_001_509, "%d %b %Y %H:%M:%S %A %j %%"),
            "26 Jul 2024 13:45:09 Friday 208 %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }
}
